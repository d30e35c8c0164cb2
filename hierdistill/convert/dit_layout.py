"""Our DiT params in the published DiT/SiT key layout and back: what an exported generator
(export.py) stores, so that the importer of published checkpoints (convert/dit.py) and the
DiT/SiT code read it.

The mapping is convert/dit.py's, run backwards (our path -> published key, kernels (in, out)
-> torch weights (out, in), the patch kernel (p, p, C, D) -> (D, C, p, p)), with the fixed
pos_embed table added. A student's interval embedder, which DiT/SiT lack, is stored under
the same pattern as the time embedder: interval_embedder.mlp.{0,2}.{weight, bias}.

Conventions: kind 'sit' stores SiT's own (velocity x - e, read by convert/dit.import_dit with
kind='sit', which negates it back); kind 'velocity' stores ours unchanged (v = e - x, t = 1
noise, the embedder reading time_scale * t), which the export's config.json names.
Only a label DiT has this layout: a text DiT, SANA or an MLP is stored under its own Flax paths
(flat_params / unflat_params).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
from flax import traverse_util

INTERVAL_PREFIX = "interval_embedder."


def has_published_layout(model) -> bool:
  """A label DiT (the DiT/SiT module tree) predicting a velocity."""
  return (type(model).__name__ == "DiT" and not model.caption_channels
          and getattr(model, "prediction", "velocity") == "velocity")


def kind_of(model) -> str:
  """'sit' when the model's conventions are SiT's (its time embedder reads 1 - t in [0, 1]),
  else 'velocity' (ours)."""
  return "sit" if (model.time_flip and float(model.time_scale) == 1.0) else "velocity"


def _published_key(path: tuple) -> tuple[str, str]:
  """(published key, how to lay the array out) for one of our param paths."""
  *mods, leaf = path
  mods = list(mods)
  if mods == ["y_embedder", "embedding_table"]:
    return "y_embedder.embedding_table.weight", "embedding"
  if mods == ["x_embedder"]:
    return f"x_embedder.proj.{'weight' if leaf == 'kernel' else 'bias'}", (
        "conv" if leaf == "kernel" else "bias")
  if mods[0].startswith("blocks_"):
    mods = ["blocks", mods[0].split("_", 1)[1]] + mods[1:]
  if mods[-1] == "adaLN_modulation":
    mods = mods + ["1"]  # nn.Sequential(SiLU, Linear)
  if mods[-1] in ("mlp_0", "mlp_2"):
    mods = mods[:-1] + ["mlp", mods[-1][-1]]
  return ".".join(mods + ["weight" if leaf == "kernel" else "bias"]), (
      "dense" if leaf == "kernel" else "bias")


def to_published(params: Dict[str, Any], model) -> Dict[str, np.ndarray]:
  """{published key: float32 array} of our params (teacher or student) for `model`."""
  from hierdistill.models.dit import sincos_pos_embed_2d  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(_plain(params))
  out = {"pos_embed": sincos_pos_embed_2d(model.hidden_size, model.grid_size)[None]}
  for path, value in flat.items():
    value = np.asarray(value, np.float32)
    key, layout = _published_key(path)
    if layout == "conv":
      value = value.transpose(3, 2, 0, 1)  # (p, p, C, D) -> (D, C, p, p)
    elif layout == "dense":
      value = value.T
    out[key] = np.ascontiguousarray(value)
  if kind_of(model) == "sit":
    _flip_prediction(out, model)
  return out


def from_published(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
  """Our nested params from {published key: array} (the inverse of to_published); the model
  decides which keys must be there (a student needs the interval embedder's)."""
  state_dict = dict(state_dict)
  if kind_of(model) == "sit":
    _flip_prediction(state_dict, model)
  state_dict.pop("pos_embed", None)
  flat = {}
  for key, value in state_dict.items():
    path, layout = _our_path(key)
    value = np.asarray(value, np.float32)
    if layout == "conv":
      value = value.transpose(2, 3, 1, 0)
    elif layout == "dense":
      value = value.T
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def _our_path(key: str) -> tuple[tuple, str]:
  parts = key.split(".")
  leaf = "kernel" if parts[-1] == "weight" else "bias"
  if key == "y_embedder.embedding_table.weight":
    return ("y_embedder", "embedding_table", "embedding"), "embedding"
  if parts[0] == "x_embedder":
    return ("x_embedder", leaf), "conv" if leaf == "kernel" else "bias"
  mods = parts[:-1]
  if mods[0] == "blocks":
    mods = [f"blocks_{mods[1]}"] + mods[2:]
  if mods[-2:] == ["adaLN_modulation", "1"]:
    mods = mods[:-1]
  if len(mods) >= 2 and mods[-2] == "mlp" and mods[-1] in ("0", "2"):
    mods = mods[:-2] + [f"mlp_{mods[-1]}"]
  return tuple(mods) + (leaf,), "dense" if leaf == "kernel" else "bias"


def _flip_prediction(state_dict: Dict[str, np.ndarray], model) -> None:
  """Ours (e - x) <-> SiT's (x - e): negate the first in_channels outputs of every patch
  position of final_layer.linear (torch layout: rows ordered (p, q, c)); its own inverse."""
  p, c_out = model.patch_size, model.resolved_out_channels
  sign = np.ones((p, p, c_out), np.float32)
  sign[..., :model.in_channels] = -1.0
  sign = sign.reshape(-1)
  state_dict["final_layer.linear.weight"] = state_dict["final_layer.linear.weight"] * sign[:, None]
  state_dict["final_layer.linear.bias"] = state_dict["final_layer.linear.bias"] * sign


def flat_params(params: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """{'a/b/kernel': float32 array}: the layout of a model without a published one."""
  return {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in traverse_util.flatten_dict(_plain(params)).items()}


def unflat_params(flat: Dict[str, np.ndarray]) -> Dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _plain(tree: Any) -> Any:
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  if isinstance(tree, dict):
    return {k: _plain(v) for k, v in tree.items()}
  return tree
