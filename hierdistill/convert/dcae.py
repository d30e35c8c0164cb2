"""Imports DC-AE in diffusers layout into models.dcae.AutoencoderDC params (no PyTorch needed).

Published: mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (SANA 1.0) and
mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers (SANA-1.5, Sprint) on the Hugging Face Hub: a folder
with config.json and diffusion_pytorch_model.safetensors (SANA pipeline folders hold it as vae/).

Key mapping: diffusers' dotted names with list indices folded into the module name
(encoder.down_blocks.3.1.attn.to_qkv_multiscale.0.proj_in.weight ->
encoder/down_blocks_3_1/attn/to_qkv_multiscale_0/proj_in/kernel); conv weights (O, I/g, kh, kw)
-> (kh, kw, I/g, O), grouped and depthwise convs included; Linear (O, I) and 1x1 convs
(O, I, 1, 1) that are Dense layers here -> (I, O); RMSNorm weight -> scale. Every key is used,
every param filled and every shape checked against the model built from config.json; a mismatch
is one line naming the key, the file and where the file is published.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
from flax import traverse_util

from hierdistill.convert.sana import variant_name
from hierdistill.convert.torch_files import load_state_dict

WHERE_PUBLISHED = ("mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (or -1.1-diffusers) on the "
                   "Hugging Face Hub (config.json and diffusion_pytorch_model.safetensors)")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_NORMS = ("norm", "norm_out")
# Config keys that diffusers accepts as one string for every stage.
_PER_STAGE = ("encoder_block_types", "decoder_block_types", "decoder_norm_types",
              "decoder_act_fns")
_FIELDS = ("in_channels", "latent_channels", "attention_head_dim", "encoder_block_types",
           "decoder_block_types", "encoder_block_out_channels", "decoder_block_out_channels",
           "encoder_layers_per_block", "decoder_layers_per_block", "encoder_qkv_multiscales",
           "decoder_qkv_multiscales", "downsample_block_type", "upsample_block_type",
           "decoder_norm_types", "decoder_act_fns", "encoder_out_shortcut",
           "decoder_in_shortcut", "decoder_conv_act_fn", "scaling_factor")


def flax_path(key: str) -> Tuple[str, ...]:
  """Our param path for a diffusers key."""
  parts = key.split(".")
  out = []
  for part in parts[:-1]:
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  leaf = parts[-1]
  if leaf == "weight":
    leaf = "scale" if out[-1] in _NORMS else "kernel"
  return tuple(out) + (leaf,)


def _to_ours(value: np.ndarray, target_ndim: int) -> np.ndarray:
  if target_ndim == 4:  # conv
    return value.transpose(2, 3, 1, 0)
  if target_ndim == 2:  # Linear, or a 1x1 conv that is a Dense layer here
    return value.reshape(value.shape[0], value.shape[1]).T
  return value


def _torch_shape(shape: Tuple[int, ...], source_ndim: int) -> Tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0]) + (1, 1) * (source_ndim == 4)
  return tuple(shape)


def read_config(folder: str) -> Dict[str, Any]:
  """AutoencoderDC fields from a diffusers config.json ({} if there is none)."""
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    return {}
  with open(cfg_path) as f:
    raw = json.load(f)
  if "block_out_channels" in raw:  # older diffusers releases: one list for both halves
    raw.setdefault("encoder_block_out_channels", raw["block_out_channels"])
    raw.setdefault("decoder_block_out_channels", raw["block_out_channels"])
  out = {}
  for key in _FIELDS:
    if key not in raw:
      continue
    value = raw[key]
    if key in _PER_STAGE and isinstance(value, str):
      side = "encoder" if key.startswith("encoder") else "decoder"
      stages = len(raw.get(f"{side}_block_out_channels", (0,) * 6))
      value = (value,) * stages
    elif key.endswith("multiscales"):
      value = tuple(tuple(s) for s in value)
    elif isinstance(value, list):
      value = tuple(value)
    out[key] = value
  return out


def param_shapes(model) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{our param path: shape} of an AutoencoderDC, from jax.eval_shape (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model.check()
  f = model.downsampling_factor
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes["params"]).items()}


def import_dcae(state_dict: Dict[str, np.ndarray], model, *, path: str = "<state dict>",
                dtype=np.float32) -> Dict[str, Any]:
  """AutoencoderDC params (nested dict of numpy arrays) from a diffusers-layout state dict."""
  try:
    want = param_shapes(model)
  except ValueError as e:
    raise ValueError(f"{path}: {e} (expected {WHERE_PUBLISHED})") from None
  flat = {}
  for key, value in state_dict.items():
    target = flax_path(key)
    if target not in want:
      raise ValueError(f"unexpected key {key!r} in {path} (expected the diffusers "
                       f"AutoencoderDC layout of {WHERE_PUBLISHED}; check the block types, "
                       "channels and layers per block)")
    expected = _torch_shape(want[target], np.ndim(value))
    if tuple(value.shape) != expected:
      raise ValueError(f"{key} in {path} has shape {tuple(value.shape)}, the model expects "
                       f"{expected} (check the DC-AE config against {WHERE_PUBLISHED})")
    flat[target] = _to_ours(np.asarray(value, np.float32), len(want[target])).astype(dtype)
  missing = [k for k in want if k not in flat]
  if missing:
    raise ValueError(f"{path} lacks the weights of {'/'.join(missing[0])} ({len(missing)} params "
                     f"missing; expected the layout of {WHERE_PUBLISHED})")
  return traverse_util.unflatten_dict(flat)


def load_dcae(path: str, *, config_key: str = "config.vae.path", overrides=None,
              variant: Optional[str] = None, dtype=np.float32):
  """(AutoencoderDC module, params) from a diffusers folder (or a SANA pipeline folder, whose
  vae/ is read) or a weights file beside its config.json.

  Sizes come from config.json (else models.dcae.DCAE_F32C32), then from `overrides`. variant:
  diffusers' weights variant ('fp16', 'bf16': diffusion_pytorch_model.fp16.safetensors); None,
  the plain file. A missing path raises FileNotFoundError naming config_key.
  """
  # pylint: disable-next=g-import-not-at-top
  from hierdistill.models.dcae import DCAE_F32C32, AutoencoderDC
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file or folder; expected "
                            f"{WHERE_PUBLISHED}")
  if os.path.isdir(path) and os.path.isdir(os.path.join(path, "vae")):
    path = os.path.join(path, "vae")
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  weights = path
  if os.path.isdir(path):
    names = [variant_name(n, variant) for n in WEIGHT_FILES]
    found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise FileNotFoundError(f"{path} has none of {', '.join(names)} (expected "
                              f"{WHERE_PUBLISHED}; pass variant= for a variant's files)")
    weights = found[0]
  model = AutoencoderDC(**{**DCAE_F32C32, **read_config(folder), **(overrides or {})})
  return model, import_dcae(load_state_dict(weights), model, path=weights, dtype=dtype)
