"""A student network and its starting params, from a teacher network of any family here (DiT,
LightningDiT, SANA): the same architecture with the interval embedder (the student reads (r, t)),
every shared param copied."""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util


def student_of(teacher: nn.Module) -> nn.Module:
  """The student network of a teacher network: the same architecture plus the interval
  embedder (interval_conditioning=True).

  A student is a velocity model in our convention whatever the teacher predicts: for a DiT
  noise predictor (prediction='ddpm_noise') it is a velocity DiT embedding 1000 t (DiT's time
  resolution). Its weights still start as the teacher's (init_student_from_teacher), but not
  its function: the DDPM adapter's 1 / (1 - t) is unbounded at t = 1, where the one-step
  student is evaluated, so the adapter cannot be kept; stage 1 re-learns the output from the
  teacher's trunk. (With a velocity teacher, SiT, u(z, r, t | c) == v(z, t | c) at step 0.)
  """
  fields = dict(interval_conditioning=True)
  if getattr(teacher, "prediction", "velocity") != "velocity":
    fields.update(prediction="velocity", time_scale=1000.0, time_flip=False)
  return teacher.clone(**fields)


def _path_str(path: Sequence[str]) -> str:
  return "/".join(str(k) for k in path)


def init_student_from_teacher(student_params: Any, teacher_params: Any) -> Dict[str, Any]:
  """Copies every teacher param into the student's tree; the student's extras (the interval
  embedder) keep their fresh (zero-output) values.

  Both trees are raw param trees (the 'params' collection, or the {'params': ...} variables
  dict for both). Values are cast to the student's leaf dtype. Returns a new nested dict.
  Raises ValueError naming the first teacher path that the student lacks or whose shape differs.
  """
  student = traverse_util.flatten_dict(_to_dict(student_params))
  teacher = traverse_util.flatten_dict(_to_dict(teacher_params))
  out = dict(student)
  for path in sorted(teacher, key=_path_str):
    value = teacher[path]
    if path not in student:
      raise ValueError(f"init_student_from_teacher: the student has no param "
                       f"{_path_str(path)!r} (teacher shape {_shape(value)}); are the two models "
                       "the same architecture?")
    if _shape(value) != _shape(student[path]):
      raise ValueError(f"init_student_from_teacher: shape mismatch at {_path_str(path)!r}: "
                       f"teacher {_shape(value)} vs student {_shape(student[path])}.")
    dtype = student[path].dtype
    # Leave same-dtype leaves untouched: no copy, and their sharding is kept.
    out[path] = value if value.dtype == dtype else jnp.asarray(value).astype(dtype)
  return traverse_util.unflatten_dict(out)


def _shape(x: Any) -> Tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _to_dict(tree: Any) -> Dict[str, Any]:
  """FrozenDict / Mapping -> plain nested dict (flatten_dict needs dicts all the way down)."""
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  if isinstance(tree, dict):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree
