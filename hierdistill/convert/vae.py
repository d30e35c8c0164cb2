"""Imports the SD-VAE in diffusers layout into models.vae.AutoencoderKL params.

Published: stabilityai/sd-vae-ft-ema on the Hugging Face Hub (the VAE of the DiT/SiT latents):
a folder with config.json and diffusion_pytorch_model.safetensors (or .bin). Either a folder or
the weights file alone is accepted (then the SD-VAE sizes of models.vae.SD_VAE are assumed).

Key mapping: diffusers' dotted names with list indices folded into the module name
(encoder.down_blocks.0.resnets.1.conv1.weight -> encoder/down_blocks_0/resnets_1/conv1/kernel);
conv weights (O, I, kh, kw) -> (kh, kw, I, O), linear (O, I) -> (I, O), GroupNorm weight ->
scale. The mid-block attention of files saved by older diffusers releases is named
query/key/value/proj_attn (and may hold 1x1 conv kernels): both namings are read.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import numpy as np

from hierdistill.convert import fill
from hierdistill.convert.torch_files import load_state_dict

WHERE_PUBLISHED = ("stabilityai/sd-vae-ft-ema on the Hugging Face Hub (config.json and "
                   "diffusion_pytorch_model.safetensors)")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_NORMS = ("norm1", "norm2", "group_norm", "conv_norm_out")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
# diffusers config keys -> AutoencoderKL fields (others, e.g. sample_size, do not shape weights).
_CONFIG_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
                  "layers_per_block", "norm_num_groups", "scaling_factor")


def flax_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """(path of the Flax param, how to lay the array out) for a diffusers key."""
  parts = key.split(".")
  out = []
  for part in parts[:-1]:
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(_OLD_ATTENTION.get(part, part))
  leaf = parts[-1]
  if out[-1] in _NORMS:
    return tuple(out) + ({"weight": "scale", "bias": "bias"}[leaf],), "vector"
  if leaf == "bias":
    return tuple(out) + ("bias",), "vector"
  return tuple(out) + ("kernel",), "weight"


def _layout(value: np.ndarray, how: str, target_ndim: int) -> np.ndarray:
  if how == "vector":
    return value
  if target_ndim == 2:  # Dense; old files hold the attention projections as 1x1 convs
    return value.reshape(value.shape[0], value.shape[1]).T
  return value.transpose(2, 3, 1, 0)


def read_config(path: str) -> Dict[str, Any]:
  """AutoencoderKL fields from a diffusers config.json beside the weights ({} if none)."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    return {}
  with open(cfg_path) as f:
    raw = json.load(f)
  out = {k: raw[k] for k in _CONFIG_FIELDS if k in raw}
  if "block_out_channels" in out:
    out["block_out_channels"] = tuple(out["block_out_channels"])
  return out


def weights_file(path: str) -> str:
  if os.path.isdir(path):
    for name in WEIGHT_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"{path} has none of {', '.join(WEIGHT_FILES)}")
  return path


def import_vae(state_dict: Dict[str, np.ndarray], model, *, path: str = "<state dict>",
               dtype=np.float32) -> Dict[str, Any]:
  """AutoencoderKL params (nested dict of numpy arrays) from a diffusers-layout state dict;
  every key used, every param filled, shapes checked (errors name the key and the file)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size = 8 * model.downsampling_factor
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, model.in_channels)))["params"]
  def entries():
    for key, value in state_dict.items():
      target, how = flax_path(key)
      yield path, key, target, value, lambda v, ndim, how=how: _layout(
          np.asarray(v, np.float32), how, ndim)

  return fill.fill_params(
      entries(), fill.param_shapes(shapes), layout="the diffusers AutoencoderKL layout",
      where=WHERE_PUBLISHED, hint="check block_out_channels and layers_per_block",
      model="the VAE", source=path, dtype=dtype)


def load_vae(path: str, *, config_key: str = "config.vae.path", overrides=None, dtype=np.float32):
  """(AutoencoderKL module, params) from a diffusers folder or weights file.

  The module's sizes come from config.json when present (else models.vae.SD_VAE), then from
  `overrides`. A missing path raises FileNotFoundError naming config_key.
  """
  from hierdistill.models.vae import SD_VAE, AutoencoderKL  # pylint: disable=g-import-not-at-top
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file or folder; expected "
                            f"{WHERE_PUBLISHED}")
  fields = {**SD_VAE, **read_config(path), **(overrides or {})}
  model = AutoencoderKL(**fields)
  weights = weights_file(path)
  return model, import_vae(load_state_dict(weights), model, path=weights, dtype=dtype)
