"""Imports the official DiT, SiT and REPA PyTorch checkpoints into hierdistill's DiT params.

Published files (state dicts of the EMA weights, 256x256 ImageNet, SD-VAE latents 32x32x4):
  SiT-XL-2-256x256.pt   SiT repository (willisma/SiT), "Sampling" section of its README
  DiT-XL-2-256x256.pt   DiT repository (facebookresearch/DiT), "Sampling" section of its README
  last.pt               REPA's SiT-XL/2 (sihyun-yu/REPA), the 4M-iteration checkpoint its
                        generate.py downloads (utils.download_model) when no --ckpt is given
Training checkpoints of these repositories ({'model', 'ema', 'opt', 'args', ...}) load too (EMA
taken).

All three use DiT's module tree (published key -> our path, torch weights (out, in) -> kernels
(in, out)):
  pos_embed (1, N, D)                      fixed sin-cos table: not a param here, only checked
  x_embedder.proj.{weight (D, C, p, p), bias}           x_embedder/{kernel (p, p, C, D), bias}
  t_embedder.mlp.{0,2}.{weight, bias}                   t_embedder/mlp_{0,2}
  y_embedder.embedding_table.weight (K + 1, D)          y_embedder/embedding_table/embedding
  blocks.{i}.adaLN_modulation.1.{weight, bias}          blocks_{i}/adaLN_modulation
  blocks.{i}.attn.{qkv,proj}.{weight, bias}             blocks_{i}/attn/{qkv,proj}
  blocks.{i}.mlp.{fc1,fc2}.{weight, bias}               blocks_{i}/mlp/{fc1,fc2}
  final_layer.adaLN_modulation.1.{weight, bias}         final_layer/adaLN_modulation
  final_layer.linear.{weight (p*p*2C, D), bias}         final_layer/linear (features (p, q, c))
The label table has K + 1 rows when the model was trained with label dropout (the published
models were): row K is the null label, which is our convention too.
REPA's SiT differs in two ways: no learn_sigma (final_layer/linear has p*p*C outputs, C = 4),
and the alignment projectors `projectors.{j}.{0,2,4}.{weight, bias}` (Linear D -> P, SiLU,
Linear P -> P, SiLU, Linear P -> z_j: the MLPs whose outputs at block encoder_depth are aligned
with DINOv2 features in training). Sampling never reads them, so they are dropped on purpose,
after checking that they are exactly such MLPs reading width D; every other key is used.

Conventions (METHOD.md): ours is z_t = (1 - t) x + t e, v = e - x, t = 1 noise.
- SiT: x_t' = t' x + (1 - t') e, t' = 0 noise, velocity x - e, embeds t' in [0, 1]. With
  t' = 1 - t the two paths are the same point, and v = -(SiT's velocity). So the model gets
  time_scale=1, time_flip=True (it embeds 1 - t), and the importer negates the prediction half of
  final_layer/linear (a linear map: -W h - b = -(W h + b) exactly):
      v(z, t | y) = -SiT(z, 1 - t, y)[:C].
- REPA: its linear path is ours (alpha_t = 1 - t, sigma_t = t, t = 1 noise, target e - x, t
  embedded in [0, 1]): time_scale=1, time_flip=False, weights unchanged.
- DiT: a DDPM noise predictor over discrete s in [0, 1000) on the VP path
  x_s = sqrt(abar_s) x + sqrt(1 - abar_s) e. Its params import unchanged into a model with
  prediction='ddpm_noise', whose call is the DDPM adapter (models/ddpm.py): it embeds the step s
  whose noise-to-signal ratio is t / (1 - t), scales z_t to x_s, and returns our velocity
  v = (eps - z) / (1 - t). Every place the chain calls the teacher (stage-1 targets, the real
  score, the fake network, samplers, eval) therefore reads a velocity.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
from flax import traverse_util

from hierdistill.convert.torch_files import load_state_dict
# DiT's noise prediction read as our velocity (the model's prediction='ddpm_noise' uses it).
from hierdistill.models.ddpm import (ddpm_alphas_cumprod, ddpm_time_of,  # pylint: disable=unused-import
                                    ddpm_velocity)

WHERE_PUBLISHED = {
    "sit": "SiT-XL-2-256x256.pt, linked from the SiT repository's README (willisma/SiT)",
    "dit": "DiT-XL-2-256x256.pt, linked from the DiT repository's README (facebookresearch/DiT)",
    "repa": ("last.pt (REPA's SiT-XL/2, 4M iterations), downloaded by generate.py of the REPA "
             "repository (sihyun-yu/REPA) when --ckpt is not given"),
}
# How each kind's time reaches the embedder, and its output layout ("learn_sigma"): the model
# fields an experiment must set for the import to be exact.
MODEL_FIELDS = {
    "sit": dict(time_scale=1.0, time_flip=True, prediction="velocity"),
    # DiT's embedder reads the DDPM step s(t) itself (models/ddpm.py): time_scale/flip unused.
    "dit": dict(prediction="ddpm_noise"),
    "repa": dict(time_scale=1.0, time_flip=False, prediction="velocity"),
}
# The alignment projectors of a REPA checkpoint: projectors.{j}.{0,2,4}.{weight,bias}.
_PROJECTOR_KEY = re.compile(r"^projectors\.(\d+)\.([024])\.(weight|bias)$")
KINDS = tuple(MODEL_FIELDS)


def published_layout(*, depth: int, hidden_size: int, patch_size: int, in_channels: int,
                     out_channels: int, num_classes: int, input_size: int,
                     mlp_ratio: float = 4.0, frequency_size: int = 256,
                     null_row: bool = True) -> Dict[str, Tuple[int, ...]]:
  """{key: shape} of a DiT/SiT state dict as the official code saves it (pos_embed included)."""
  d, p = hidden_size, patch_size
  h = int(d * mlp_ratio)
  n = (input_size // p) ** 2
  layout = {
      "pos_embed": (1, n, d),
      "x_embedder.proj.weight": (d, in_channels, p, p), "x_embedder.proj.bias": (d,),
      "t_embedder.mlp.0.weight": (d, frequency_size), "t_embedder.mlp.0.bias": (d,),
      "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
      "y_embedder.embedding_table.weight": (num_classes + int(null_row), d),
  }
  for i in range(depth):
    b = f"blocks.{i}."
    layout.update({
        b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,),
        b + "mlp.fc2.weight": (d, h), b + "mlp.fc2.bias": (d,),
        b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
    })
  layout.update({
      "final_layer.adaLN_modulation.1.weight": (2 * d, d),
      "final_layer.adaLN_modulation.1.bias": (2 * d,),
      "final_layer.linear.weight": (p * p * out_channels, d),
      "final_layer.linear.bias": (p * p * out_channels,),
  })
  return layout


def _layout_of_model(model) -> Dict[str, Tuple[int, ...]]:
  return published_layout(
      depth=model.depth, hidden_size=model.hidden_size, patch_size=model.patch_size,
      in_channels=model.in_channels, out_channels=model.resolved_out_channels,
      num_classes=model.num_classes, input_size=model.input_size, mlp_ratio=model.mlp_ratio,
      frequency_size=model.frequency_size)


def _torch_to_flax_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """('x_embedder', 'kernel'), 'conv' for a published key; the second item says how to lay the
  array out: 'conv', 'dense', 'bias', 'embedding'."""
  parts = key.split(".")
  leaf = parts[-1]
  if key == "y_embedder.embedding_table.weight":
    return ("y_embedder", "embedding_table", "embedding"), "embedding"
  if parts[0] == "x_embedder":
    return ("x_embedder", "kernel" if leaf == "weight" else "bias"), (
        "conv" if leaf == "weight" else "bias")
  mods = parts[:-1]
  if mods[0] == "blocks":
    mods = [f"blocks_{mods[1]}"] + mods[2:]
  if mods[-1] == "1" and mods[-2] == "adaLN_modulation":  # nn.Sequential(SiLU, Linear)
    mods = mods[:-1]
  if mods[-2] == "mlp" and mods[-1] in ("0", "2"):  # t_embedder.mlp.{0,2}
    mods = mods[:-2] + [f"mlp_{mods[-1]}"]
  kind = "dense" if leaf == "weight" else "bias"
  return tuple(mods) + ("kernel" if leaf == "weight" else "bias",), kind


def _error(message: str, path: str, kind: str) -> ValueError:
  return ValueError(f"{message} in {path} (expected the {kind.upper()} layout of "
                    f"{WHERE_PUBLISHED[kind]})")


def check_model_fields(model, kind: str, config_prefix: str = "config.model") -> None:
  """Raises naming the config key when the model's time mapping or output layout would make the
  import inexact."""
  if kind not in KINDS:
    raise ValueError(f"unknown checkpoint kind {kind!r}; choose from {KINDS}")
  for field, value in MODEL_FIELDS[kind].items():
    if getattr(model, field) != value:
      raise ValueError(f"{config_prefix}.{field}={getattr(model, field)!r} but a {kind.upper()} "
                       f"checkpoint needs {value!r} (convert/dit.py explains the convention)")


def import_dit(state_dict: Dict[str, np.ndarray], model, *, kind: str = "sit",
               path: str = "<state dict>", dtype=np.float32,
               pos_embed_atol: float = 1e-5) -> Dict[str, Any]:
  """Our DiT params (a nested dict of numpy arrays) from a published DiT/SiT state dict.

  model: the hierdistill DiT the params are for (a teacher: interval_conditioning=False), with
    MODEL_FIELDS[kind] set and out_channels matching the file (8 for the published models).
  kind: 'sit' (negates the velocity, see the module docstring) or 'dit' (noise prediction).
  Every key of the file must be used and every param filled, shapes equal: a mismatch raises
  one line naming the key and the file. The file's fixed pos_embed must equal our sin-cos table
  (a check that tokens are numbered alike).
  """
  check_model_fields(model, kind)
  if model.interval_conditioning:
    raise ValueError("import_dit builds a teacher: pass a model with interval_conditioning="
                     "False (a student is then made by init_student_from_teacher)")
  if kind == "repa":
    state_dict = drop_projectors(state_dict, model.hidden_size, path)
  expected = _layout_of_model(model)
  emb_key = "y_embedder.embedding_table.weight"
  if emb_key in state_dict and state_dict[emb_key].shape[0] == model.num_classes:
    raise _error(f"{emb_key} has {model.num_classes} rows, no null-label row: the model was "
                 "trained without label dropout and cannot be guided (CFG needs row "
                 f"{model.num_classes})", path, kind)
  missing = [k for k in expected if k not in state_dict]
  if missing:
    raise _error(f"missing key {missing[0]!r} ({len(missing)} missing in all)", path, kind)
  unexpected = [k for k in state_dict if k not in expected]
  if unexpected:
    hint = (f"is the model depth {model.depth}?" if not _PROJECTOR_KEY.match(unexpected[0])
            else "a REPA checkpoint: set config.teacher.checkpoint_kind='repa'")
    raise _error(f"unexpected key {unexpected[0]!r} ({len(unexpected)} in all; {hint})",
                 path, kind)
  for key, shape in expected.items():
    if tuple(state_dict[key].shape) != shape:
      raise _error(f"{key} has shape {tuple(state_dict[key].shape)}, the model expects {shape} "
                   "(check config.model sizes, in_channels, out_channels, num_classes)",
                   path, kind)

  from hierdistill.models.dit import sincos_pos_embed_2d  # pylint: disable=g-import-not-at-top
  table = sincos_pos_embed_2d(model.hidden_size, model.grid_size)
  err = float(np.max(np.abs(np.asarray(state_dict["pos_embed"], np.float32)[0] - table)))
  if err > pos_embed_atol:
    raise _error(f"pos_embed differs from DiT's 2-D sin-cos table by {err:.3g}", path, kind)

  flat = {}
  for key, value in state_dict.items():
    if key == "pos_embed":
      continue
    value = np.asarray(value, np.float32)
    flax_path, layout = _torch_to_flax_path(key)
    if layout == "conv":
      value = value.transpose(2, 3, 1, 0)  # (D, C, p, p) -> (p, p, C, D)
    elif layout == "dense":
      value = value.T
    flat[flax_path] = value
  if kind == "sit":
    _negate_prediction(flat, model.patch_size, model.resolved_out_channels, model.in_channels)
  return traverse_util.unflatten_dict({k: v.astype(dtype) for k, v in flat.items()})


def drop_projectors(state_dict: Dict[str, np.ndarray], hidden_size: int,
                    path: str = "<state dict>") -> Dict[str, np.ndarray]:
  """The state dict without REPA's alignment projectors, after checking that each one is the
  MLP REPA trains (Linear D -> P, SiLU, Linear P -> P, SiLU, Linear P -> z): a key of another
  shape is not dropped silently but raises naming it."""
  kept, projectors = {}, {}
  for key, value in state_dict.items():
    match = _PROJECTOR_KEY.match(key)
    if match:
      projectors.setdefault(int(match.group(1)), {})[(match.group(2), match.group(3))] = value
    elif key.startswith("projectors."):
      raise _error(f"unexpected key {key!r} (a REPA projector is Linear, SiLU, Linear, SiLU, "
                   "Linear: keys projectors.{j}.{0,2,4}.{weight,bias})", path, "repa")
    else:
      kept[key] = value
  if not projectors:
    raise _error("no projectors.* keys: not a REPA checkpoint (a SiT file: set "
                 "config.teacher.checkpoint_kind='sit')", path, "repa")
  for j, proj in sorted(projectors.items()):
    p_dim = proj.get(("0", "weight"), np.zeros((0, 0))).shape[0]
    z_dim = proj.get(("4", "weight"), np.zeros((0, 0))).shape[0]
    want = {("0", "weight"): (p_dim, hidden_size), ("0", "bias"): (p_dim,),
            ("2", "weight"): (p_dim, p_dim), ("2", "bias"): (p_dim,),
            ("4", "weight"): (z_dim, p_dim), ("4", "bias"): (z_dim,)}
    for (layer, leaf), shape in want.items():
      got = proj.get((layer, leaf))
      key = f"projectors.{j}.{layer}.{leaf}"
      if got is None:
        raise _error(f"missing key {key!r} of projector {j}", path, "repa")
      if tuple(got.shape) != shape:
        raise _error(f"{key} has shape {tuple(got.shape)}, expected {shape} (projector {j} reads "
                     f"the width {hidden_size} of the blocks)", path, "repa")
  return kept


def _negate_prediction(flat, patch: int, out_channels: int, in_channels: int) -> None:
  """SiT predicts x - e, we predict e - x: flip the sign of the first in_channels outputs of
  every patch position (features ordered (p, q, c)); the learn-sigma half is left as it is."""
  sign = np.ones((patch, patch, out_channels), np.float32)
  sign[..., :in_channels] = -1.0
  sign = sign.reshape(-1)
  flat[("final_layer", "linear", "kernel")] = flat[("final_layer", "linear", "kernel")] * sign
  flat[("final_layer", "linear", "bias")] = flat[("final_layer", "linear", "bias")] * sign


def load_dit_checkpoint(path: str, model, *, kind: str = "sit", config_key: str = "",
                        dtype=np.float32) -> Dict[str, Any]:
  """import_dit of a file; a missing file raises FileNotFoundError naming the config key."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f"{config_key or 'teacher checkpoint'}={path!r}: no such file; expected "
        f"{WHERE_PUBLISHED[kind] if kind in WHERE_PUBLISHED else 'a DiT/SiT .pt'}")
  return import_dit(load_state_dict(path), model, kind=kind, path=path, dtype=dtype)


def param_count(layout: Dict[str, Tuple[int, ...]]) -> int:
  return sum(math.prod(s) for s in layout.values())
