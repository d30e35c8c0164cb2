"""Filling a Flax param tree from a published state dict, with every key and shape checked.

The importers differ in how a published key maps to a Flax path and layout; what they share is
here: every key of the file is used (or skipped on purpose by the importer), every parameter is
filled, every shape is checked, and each failure is one line naming the key, the file and where
such a file is published.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np
from flax import traverse_util

FlaxPath = Tuple[str, ...]


def param_shapes(abstract_params) -> Dict[FlaxPath, Tuple[int, ...]]:
  """{flax path: shape} of a (jax.eval_shape'd) param tree."""
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params).items()}


Entry = Tuple[str, str, Optional[FlaxPath], np.ndarray, Callable]


def fill_params(entries: Iterable[Entry],
                want: Dict[FlaxPath, Tuple[int, ...]], *, layout: str, where: str, hint: str,
                model: str, source: str, missing_name: Callable[[FlaxPath], str] = "/".join,
                dtype=np.float32) -> Dict[str, Any]:
  """The nested param dict from (file, key, flax path, value, to_ours) entries.

  to_ours(value, target_ndim) -> the file's array in our layout. A path of None, or one the
  model lacks, is an unexpected key. layout: the published layout's name ("the CLIPModel
  layout"); hint: what to check when a key is unexpected; model: who expects the shapes
  ("CLIP"); source: the file(s) named when a parameter is missing; missing_name: a Flax path
  as the file would name it.
  """
  flat = {}
  for file, key, target, value, to_ours in entries:
    if target is None or target not in want:
      raise ValueError(f"unexpected key {key!r} in {file} (expected {layout} of {where}; "
                       f"{hint})")
    array = to_ours(value, len(want[target]))
    if array.shape != want[target]:
      raise ValueError(f"{key} in {file} has shape {tuple(np.shape(value))}, {model} expects "
                       f"{want[target]} (after layout); check the sizes against {where}")
    flat[target] = array.astype(dtype)
  missing = [k for k in want if k not in flat]
  if missing:
    raise ValueError(f"{source} lacks {missing_name(missing[0])} ({len(missing)} params "
                     f"missing; expected the layout of {where})")
  return traverse_util.unflatten_dict(flat)
