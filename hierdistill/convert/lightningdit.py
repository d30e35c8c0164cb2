"""Imports the official LightningDiT checkpoint (hustvl/LightningDiT) into models/lightningdit.

Published file: lightningdit-xl-imagenet256-800ep.pt (EMA weights of LightningDiT-XL/1 on
VA-VAE f16d32 latents, FID 1.35 with CFG in the repository's README), on the Hugging Face Hub as
hustvl/lightningdit-xl-imagenet256-800ep; train.py checkpoints ({'model', 'ema', ...}) load too.

Published key -> our path (torch weights (out, in) -> kernels (in, out)):
  pos_embed (1, N, D)                           fixed sin-cos table: only checked
  feat_rope.freqs_cos, feat_rope.freqs_sin (N, hd)  fixed rotary tables: only checked
  x_embedder.proj.{weight (D, C, p, p), bias}   x_embedder/{kernel (p, p, C, D), bias}
  t_embedder.mlp.{0,2}, y_embedder.embedding_table.weight (K + 1, D)   as DiT's
  blocks.{i}.norm{1,2}.weight (D,)              blocks_{i}/norm{1,2}/scale
  blocks.{i}.attn.{qkv,proj}.{weight, bias}     blocks_{i}/attn/{qkv,proj}
  blocks.{i}.attn.{q,k}_norm.weight (hd,)       blocks_{i}/attn/{q,k}_norm/scale (qk_norm only)
  blocks.{i}.mlp.{w12,w3}.{weight, bias}        blocks_{i}/mlp/{w12,w3}
  blocks.{i}.adaLN_modulation.1.{weight, bias}  blocks_{i}/adaLN_modulation
  final_layer.norm_final.weight                 final_layer/norm_final/scale
  final_layer.{adaLN_modulation.1, linear}      final_layer/{adaLN_modulation, linear}

Convention: LightningDiT's transport is SiT's (x_t' = t' x + (1 - t') e, t' = 0 noise, velocity
x - e, t' embedded in [0, 1]), so as for SiT the model embeds 1 - t (time_scale=1,
time_flip=True) and the final layer is negated: v(z, t | y) = -LightningDiT(z, 1 - t, y).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Tuple

import numpy as np
from flax import traverse_util

from hierdistill.convert import dit as convert_dit
from hierdistill.convert.torch_files import load_state_dict

WHERE_PUBLISHED = ("lightningdit-xl-imagenet256-800ep.pt, hustvl/lightningdit-xl-imagenet256-800ep "
                   "on the Hugging Face Hub (linked from the hustvl/LightningDiT README)")
MODEL_FIELDS = dict(time_scale=1.0, time_flip=True, prediction="velocity")


def published_layout(*, depth: int, hidden_size: int, num_heads: int, patch_size: int,
                     in_channels: int, num_classes: int, input_size: int,
                     mlp_ratio: float = 4.0, qk_norm: bool = False, use_rope: bool = True,
                     frequency_size: int = 256) -> Dict[str, Tuple[int, ...]]:
  """{key: shape} of a LightningDiT state dict as the official code saves it (buffers
  included: pos_embed and, with use_rope, the rotary tables)."""
  d, p = hidden_size, patch_size
  hd = d // num_heads
  ffn = int(2 / 3 * int(d * mlp_ratio))
  n = (input_size // p) ** 2
  layout = {
      "pos_embed": (1, n, d),
      "x_embedder.proj.weight": (d, in_channels, p, p), "x_embedder.proj.bias": (d,),
      "t_embedder.mlp.0.weight": (d, frequency_size), "t_embedder.mlp.0.bias": (d,),
      "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
      "y_embedder.embedding_table.weight": (num_classes + 1, d),
  }
  if use_rope:
    layout.update({"feat_rope.freqs_cos": (n, hd), "feat_rope.freqs_sin": (n, hd)})
  for i in range(depth):
    b = f"blocks.{i}."
    layout.update({
        b + "norm1.weight": (d,), b + "norm2.weight": (d,),
        b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "mlp.w12.weight": (2 * ffn, d), b + "mlp.w12.bias": (2 * ffn,),
        b + "mlp.w3.weight": (d, ffn), b + "mlp.w3.bias": (d,),
        b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
    })
    if qk_norm:
      layout.update({b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,)})
  layout.update({
      "final_layer.norm_final.weight": (d,),
      "final_layer.adaLN_modulation.1.weight": (2 * d, d),
      "final_layer.adaLN_modulation.1.bias": (2 * d,),
      "final_layer.linear.weight": (p * p * in_channels, d),
      "final_layer.linear.bias": (p * p * in_channels,),
  })
  return layout


def layout_of_model(model) -> Dict[str, Tuple[int, ...]]:
  return published_layout(
      depth=model.depth, hidden_size=model.hidden_size, num_heads=model.num_heads,
      patch_size=model.patch_size, in_channels=model.in_channels, num_classes=model.num_classes,
      input_size=model.input_size, mlp_ratio=model.mlp_ratio, qk_norm=model.qk_norm,
      use_rope=model.use_rope, frequency_size=model.frequency_size)


def _error(message: str, path: str) -> ValueError:
  return ValueError(f"{message} in {path} (expected the LightningDiT layout of {WHERE_PUBLISHED})")


def _flax_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """(our path, layout) of a published key; layout in 'conv', 'dense', 'bias', 'embedding',
  'scale'."""
  if key == "y_embedder.embedding_table.weight":
    return ("y_embedder", "embedding_table", "embedding"), "embedding"
  parts = key.split(".")
  leaf, mods = parts[-1], parts[:-1]
  if mods[0] == "x_embedder":
    return ("x_embedder", "kernel" if leaf == "weight" else "bias"), (
        "conv" if leaf == "weight" else "bias")
  if mods[0] == "blocks":
    mods = [f"blocks_{mods[1]}"] + mods[2:]
  if mods[-1] == "1" and mods[-2] == "adaLN_modulation":
    mods = mods[:-1]
  if mods[-2:] in (["mlp", "0"], ["mlp", "2"]) and mods[0] == "t_embedder":
    mods = mods[:-2] + [f"mlp_{mods[-1]}"]
  if mods[-1] in ("norm1", "norm2", "norm_final", "q_norm", "k_norm"):
    return tuple(mods) + ("scale",), "scale"
  return tuple(mods) + ("kernel" if leaf == "weight" else "bias",), (
      "dense" if leaf == "weight" else "bias")


def import_lightningdit(state_dict: Dict[str, np.ndarray], model, *,
                        path: str = "<state dict>", dtype=np.float32,
                        table_atol: float = 1e-5) -> Dict[str, Any]:
  """Our LightningDiT params (nested numpy dict) from an official state dict.

  model: a models/lightningdit.LightningDiT teacher (interval_conditioning=False) with
  MODEL_FIELDS set. Every key must be used and every param filled with its shape; the fixed
  tables (pos_embed, the rotary cos/sin) must equal ours. A mismatch raises one line naming the
  key and where the file is published.
  """
  for field, value in MODEL_FIELDS.items():
    if getattr(model, field) != value:
      raise ValueError(f"config.model.{field}={getattr(model, field)!r} but a LightningDiT "
                       f"checkpoint needs {value!r} (convert/lightningdit.py explains)")
  if model.interval_conditioning:
    raise ValueError("import_lightningdit builds a teacher: pass interval_conditioning=False")
  expected = layout_of_model(model)
  missing = [k for k in expected if k not in state_dict]
  if missing:
    raise _error(f"missing key {missing[0]!r} ({len(missing)} missing in all)", path)
  unexpected = [k for k in state_dict if k not in expected]
  if unexpected:
    raise _error(f"unexpected key {unexpected[0]!r} ({len(unexpected)} in all; check "
                 "config.model depth, qk_norm, use_rope)", path)
  for key, shape in expected.items():
    if tuple(state_dict[key].shape) != shape:
      raise _error(f"{key} has shape {tuple(state_dict[key].shape)}, the model expects {shape} "
                   "(check config.model sizes, in_channels, num_classes)", path)

  from hierdistill.models.dit import sincos_pos_embed_2d  # pylint: disable=g-import-not-at-top
  from hierdistill.models.lightningdit import rope_tables  # pylint: disable=g-import-not-at-top
  tables = {"pos_embed": sincos_pos_embed_2d(model.hidden_size, model.grid_size)[None]}
  if model.use_rope:
    cos, sin = rope_tables(model.hidden_size // model.num_heads, model.grid_size,
                           model.rope_theta)
    tables.update({"feat_rope.freqs_cos": cos, "feat_rope.freqs_sin": sin})
  for key, table in tables.items():
    err = float(np.max(np.abs(np.asarray(state_dict[key], np.float32) - table)))
    if err > table_atol:
      raise _error(f"{key} differs from the fixed table it should hold by {err:.3g}", path)

  flat = {}
  for key, value in state_dict.items():
    if key in tables:
      continue
    value = np.asarray(value, np.float32)
    flax_path, layout = _flax_path(key)
    if layout == "conv":
      value = value.transpose(2, 3, 1, 0)
    elif layout == "dense":
      value = value.T
    flat[flax_path] = value
  # SiT's velocity x - e -> ours e - x: every output channel (no learn_sigma half).
  convert_dit._negate_prediction(flat, model.patch_size, model.in_channels,  # pylint: disable=protected-access
                                 model.in_channels)
  return traverse_util.unflatten_dict({k: v.astype(dtype) for k, v in flat.items()})


def load_lightningdit_checkpoint(path: str, model, *, config_key: str = "",
                                 dtype=np.float32) -> Dict[str, Any]:
  """import_lightningdit of a file ('ema' taken from a training checkpoint)."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"{config_key or 'teacher checkpoint'}={path!r}: no such file; "
                            f"expected {WHERE_PUBLISHED}")
  return import_lightningdit(load_state_dict(path), model, path=path, dtype=dtype)


def param_count(layout: Dict[str, Tuple[int, ...]]) -> int:
  """What torch counts as the model's parameters: the layout without the rotary buffers
  (pos_embed is a frozen nn.Parameter there, so it counts, as in DiT's published figures)."""
  return sum(math.prod(s) for k, s in layout.items() if not k.startswith("feat_rope."))


def to_published(params: Dict[str, Any], model) -> Dict[str, np.ndarray]:
  """{official key: float32 array} of a LightningDiT teacher's params: import_lightningdit run
  backwards (the fixed tables written, the prediction negated back to LightningDiT's x - e
  when the model holds its time convention, MODEL_FIELDS). The exporter of export_formats.py."""
  from hierdistill.models.dit import sincos_pos_embed_2d  # pylint: disable=g-import-not-at-top
  from hierdistill.models.lightningdit import rope_tables  # pylint: disable=g-import-not-at-top
  flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(
      params.unfreeze() if hasattr(params, "unfreeze") else params).items()}
  if all(getattr(model, f) == v for f, v in MODEL_FIELDS.items()):
    convert_dit._negate_prediction(flat, model.patch_size, model.in_channels,  # pylint: disable=protected-access
                                   model.in_channels)
  out = {"pos_embed": sincos_pos_embed_2d(model.hidden_size, model.grid_size)[None]}
  if model.use_rope:
    out["feat_rope.freqs_cos"], out["feat_rope.freqs_sin"] = rope_tables(
        model.hidden_size // model.num_heads, model.grid_size, model.rope_theta)
  for key in layout_of_model(model):
    if key in out:
      continue
    path, layout = _flax_path(key)
    value = flat[path]
    if layout == "conv":
      value = value.transpose(3, 2, 0, 1)  # (p, p, C, D) -> (D, C, p, p)
    elif layout == "dense":
      value = value.T
    out[key] = np.ascontiguousarray(value, np.float32)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}
