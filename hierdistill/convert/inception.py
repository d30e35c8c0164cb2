"""Imports the FID Inception-v3 weights of pytorch-fid into evaluation.inception.FIDInceptionV3.

Published: pt_inception-2015-12-05-6726825d.pth, a release asset of the pytorch-fid repository
(mseitzer/pytorch-fid, release "fid_weights"): TensorFlow's 2015 Inception graph (the one FID,
IS and ADM's evaluator run) ported to torchvision's Inception3 layout with 1008 classes.

Keys (torchvision's Inception3 without AuxLogits), e.g. Mixed_5b.branch1x1.conv.weight and
Mixed_5b.branch1x1.bn.{weight, bias, running_mean, running_var[, num_batches_tracked]}, and
fc.{weight (1008, 2048), bias}: conv weights (O, I, kh, kw) -> kernels (kh, kw, I, O); the
BatchNorm's weight, bias, running_mean, running_var -> bn/{scale, bias, mean, var}; fc weight
transposed. num_batches_tracked and AuxLogits.* (if a file has them) are not used.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import numpy as np
from flax import traverse_util

from hierdistill.convert.torch_files import load_state_dict

WHERE_PUBLISHED = ("pt_inception-2015-12-05-6726825d.pth, the 'fid_weights' release asset of "
                   "the pytorch-fid repository (mseitzer/pytorch-fid)")
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _skipped(key: str) -> bool:
  return key.endswith("num_batches_tracked") or key.startswith("AuxLogits.")


def flax_path(key: str) -> Tuple[Tuple[str, ...], str]:
  parts = key.split(".")
  if parts[-2] == "bn":
    return tuple(parts[:-1]) + (_BN[parts[-1]],), "vector"
  if parts[-1] == "bias":
    return tuple(parts[:-1]) + ("bias",), "vector"
  return tuple(parts[:-1]) + ("kernel",), "conv" if parts[-2] == "conv" else "dense"


def torch_key(path: Tuple[str, ...]) -> str:
  """The published key of a Flax param path (the inverse of flax_path)."""
  inverse = {v: k for k, v in _BN.items()}
  if len(path) >= 2 and path[-2] == "bn":
    return ".".join(path[:-1] + (inverse[path[-1]],))
  return ".".join(path[:-1] + ("weight" if path[-1] == "kernel" else "bias",))


def published_layout(model=None) -> Dict[str, Tuple[int, ...]]:
  """{key: shape} of the published file (no num_batches_tracked), from the Flax module."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hierdistill.evaluation.inception import FIDInceptionV3  # pylint: disable=g-import-not-at-top
  model = model or FIDInceptionV3()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))["params"]
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    shape = tuple(leaf.shape)
    if path[-1] == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    out[torch_key(path)] = shape
  return out


def import_inception(state_dict: Dict[str, np.ndarray], model=None, *,
                     path: str = "<state dict>") -> Dict[str, Any]:
  """FIDInceptionV3 params from pytorch-fid's state dict: every key and shape checked."""
  want = published_layout(model)
  flat = {}
  for key, value in state_dict.items():
    if _skipped(key):
      continue
    if key not in want:
      raise ValueError(f"unexpected key {key!r} in {path} (expected the layout of "
                       f"{WHERE_PUBLISHED})")
    if tuple(value.shape) != want[key]:
      raise ValueError(f"{key} in {path} has shape {tuple(value.shape)}, expected {want[key]} "
                       f"(the layout of {WHERE_PUBLISHED})")
    target, how = flax_path(key)
    value = np.asarray(value, np.float32)
    if how == "conv":
      value = value.transpose(2, 3, 1, 0)
    elif how == "dense":
      value = value.T
    flat[target] = value
  missing = [k for k in want if flax_path(k)[0] not in flat]
  if missing:
    raise ValueError(f"{path} lacks {missing[0]!r} ({len(missing)} keys missing; expected the "
                     f"layout of {WHERE_PUBLISHED})")
  return traverse_util.unflatten_dict(flat)


def load_inception(path: str, *, config_key: str = "config.eval.inception_weights"
                   ) -> Dict[str, Any]:
  """Params of the published FID Inception from its file; a missing file raises
  FileNotFoundError naming config_key and where the file is published."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file; expected {WHERE_PUBLISHED}")
  return import_inception(load_state_dict(path), path=path)
