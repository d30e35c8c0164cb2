"""Imports VA-VAE (LDM's KL autoencoder layout) into models.vae.AutoencoderKL params.

Published: vavae-imagenet256-f16d32-dinov2.pt, hustvl/vavae-imagenet256-f16d32-dinov2 on the
Hugging Face Hub (linked from the hustvl/LightningDiT README), the tokenizer of LightningDiT-XL;
its latents_stats.pt (same repository: per-channel 'mean' and 'std', each (1, 32, 1, 1)) is
what LightningDiT normalises the latents with. The network is LDM's AutoencoderKL
(tokenizer/configs/vavae_f16d32.yaml): models.vae.VA_VAE_F16D32.

LDM key -> the diffusers key that convert/vae.py maps (L levels; decoder level i is up block
L - 1 - i):
  {encoder,decoder}.conv_in, .norm_out -> .conv_norm_out, .conv_out
  encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}
                                     -> encoder.down_blocks.{i}.resnets.{j}.{..., conv_shortcut}
  encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}
                                     -> encoder.down_blocks.{i}.attentions.{j}.{group_norm,
                                        to_q, to_k, to_v, to_out.0} (1x1 convs -> Dense)
  encoder.down.{i}.downsample.conv   -> encoder.down_blocks.{i}.downsamplers.0.conv
  decoder.up.{i}.{block,attn}.{j}    -> decoder.up_blocks.{L-1-i}.{resnets,attentions}.{j}
  decoder.up.{i}.upsample.conv       -> decoder.up_blocks.{L-1-i}.upsamplers.0.conv
  *.mid.{block_1, attn_1, block_2}   -> *.mid_block.{resnets.0, attentions.0, resnets.1}
  quant_conv, post_quant_conv        unchanged
A training checkpoint ({'state_dict': ...}) also holds what only training reads: the loss
(LPIPS, discriminator), the vision foundation model and its projection (loss.*,
foundation_model.*, linear_proj.*); those are dropped on purpose. Any other key must map.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Tuple

import numpy as np

from hierdistill.convert import fill
from hierdistill.convert import vae as convert_vae
from hierdistill.convert.torch_files import load_state_dict

WHERE_PUBLISHED = ("vavae-imagenet256-f16d32-dinov2.pt, hustvl/vavae-imagenet256-f16d32-dinov2 "
                   "on the Hugging Face Hub (linked from the hustvl/LightningDiT README)")
STATS_PUBLISHED = ("latents_stats.pt, hustvl/vavae-imagenet256-f16d32-dinov2 on the Hugging "
                   "Face Hub (LightningDiT's per-channel latent mean and std)")
TRAINING_ONLY = ("loss.", "foundation_model.", "linear_proj.")
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
              "proj_out": "to_out.0"}


def diffusers_key(key: str, num_levels: int) -> str:
  """The diffusers AutoencoderKL key of an LDM key (see the module docstring)."""
  key = key.replace(".norm_out.", ".conv_norm_out.").replace(".nin_shortcut.", ".conv_shortcut.")
  key = key.replace(".mid.block_1.", ".mid_block.resnets.0.")
  key = key.replace(".mid.block_2.", ".mid_block.resnets.1.")
  key = key.replace(".mid.attn_1.", ".mid_block.attentions.0.")
  key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
  key = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", key)
  key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.",
               key)
  match = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)$", key)
  if match:
    level, part, rest = int(match.group(1)), match.group(2), match.group(3)
    part = {"block": "resnets", "attn": "attentions", "upsample": "upsamplers.0"}[part]
    key = f"decoder.up_blocks.{num_levels - 1 - level}.{part}.{rest}"
  match = re.match(r"^(.*\.attentions\.\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$", key)
  if match:
    key = f"{match.group(1)}.{_ATTENTION[match.group(2)]}.{match.group(3)}"
  return key


def import_vavae(state_dict: Dict[str, np.ndarray], model, *, path: str = "<state dict>",
                 dtype=np.float32) -> Dict[str, Any]:
  """AutoencoderKL params (nested numpy dict) from an LDM-layout (VA-VAE) state dict: every
  key but the training-only ones used, every param filled, shapes checked; errors name the
  LDM key and where the file is published."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size = 8 * model.downsampling_factor
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, model.in_channels)))["params"]
  levels = len(tuple(model.block_out_channels))
  layout = convert_vae._layout  # pylint: disable=protected-access  (the same diffusers layouts)

  def entries():
    for key, value in state_dict.items():
      if key.startswith(TRAINING_ONLY):
        continue
      target, how = convert_vae.flax_path(diffusers_key(key, levels))
      yield path, key, target, value, lambda v, ndim, how=how: layout(
          np.asarray(v, np.float32), how, ndim)

  return fill.fill_params(
      entries(), fill.param_shapes(shapes), layout="the LDM AutoencoderKL layout",
      where=WHERE_PUBLISHED, hint="check the VAE sizes and attention_levels", model="the VAE",
      source=path, dtype=dtype)


def load_vavae(path: str, *, config_key: str = "config.vae.path", dtype=np.float32):
  """(AutoencoderKL with VA_VAE_F16D32's sizes, params) from the published .pt ('state_dict'
  unwrapped). A missing path raises FileNotFoundError naming config_key."""
  from hierdistill.models.vae import VA_VAE_F16D32, AutoencoderKL  # pylint: disable=g-import-not-at-top
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file; expected {WHERE_PUBLISHED}")
  model = AutoencoderKL(**VA_VAE_F16D32)
  return model, import_vavae(load_state_dict(path), model, path=path, dtype=dtype)


def load_latent_stats(path: str, *, channels: int = 32, config_key: str = "config.vae.stats_path"
                      ) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, std), each (channels,) float32, from LightningDiT's latents_stats.pt
  ({'mean': (1, C, 1, 1), 'std': (1, C, 1, 1)}); one line naming the key when wrong."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file; expected {STATS_PUBLISHED}")
  from hierdistill.convert.torch_files import load_torch_file  # pylint: disable=g-import-not-at-top
  stats = load_torch_file(path)
  out = []
  for name in ("mean", "std"):
    if not isinstance(stats, dict) or name not in stats:
      raise ValueError(f"{path} has no {name!r} entry (expected {STATS_PUBLISHED})")
    a = np.asarray(stats[name], np.float32).reshape(-1)
    if a.shape != (channels,):
      raise ValueError(f"{path}: {name!r} has {a.size} values, the VAE has {channels} latent "
                       f"channels (expected {STATS_PUBLISHED})")
    out.append(a)
  return out[0], out[1]
