"""Reads published PyTorch weight files into numpy, with or without PyTorch installed.

- `.safetensors`: read by the `safetensors` package (numpy API; no PyTorch).
- `.pt` / `.pth` / `.bin` in PyTorch's zip format (every file torch.save wrote since 1.6): read
  here by a restricted unpickler that rebuilds tensors as numpy arrays from the archive's raw
  storages. It allows only the globals a state dict needs, so, unlike a plain pickle load, a
  file cannot run code (the same guarantee as torch.load(weights_only=True)).
- PyTorch's legacy (pre-1.6, non-zip) format: only through torch.load, so it needs the [torch]
  extra; the error says so.

Everything returns a flat {name: np.ndarray} dict in the file's own key names and dtypes
(bfloat16 through ml_dtypes, which jax ships).
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Dict

import ml_dtypes
import numpy as np

# The dtype of each storage class a torch pickle names (torch/storage.py's legacy typed
# storages, which torch.save still writes to record the dtype).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
  """One raw storage of the archive, as a 1-D numpy array."""

  def __init__(self, array: np.ndarray):
    self.array = array


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *unused) -> np.ndarray:
  del unused  # requires_grad, backward hooks, metadata: meaningless for weights
  if not size:
    # A 0-dim tensor (a loss's logvar, an optimiser's step) stays a 0-dim array: indexing with
    # [offset] would give a numpy scalar, which load_state_dict rejects as not an array.
    return storage.array[offset:offset + 1].reshape(()).copy()
  item = storage.array.itemsize
  view = np.lib.stride_tricks.as_strided(storage.array[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _Namespace:
  """Stands in for argparse.Namespace: the training checkpoints of DiT, SiT, REPA and
  LightningDiT pickle their command-line args under 'args'; its fields are plain values."""

  def __setstate__(self, state):
    self.__dict__.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch zip archive's data.pkl: tensors become numpy arrays, nothing else runs."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str, little: bool):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._byteorder = "<" if little else ">"
    self._storages: Dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return name
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "argparse" and name == "Namespace":
      return _Namespace
    raise pickle.UnpicklingError(
        f"{self._path}: refuses to unpickle {module}.{name}: only state dicts of tensors are "
        "read (the file holds other objects; re-save its state_dict with torch.save)")

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid
    if kind != "storage":
      raise pickle.UnpicklingError(f"{self._path}: unknown persistent id {kind!r}")
    if key not in self._storages:
      dtype = np.dtype(_STORAGE_DTYPES[storage_type]).newbyteorder(self._byteorder)
      raw = self._archive.read(f"{self._prefix}/data/{key}")
      array = np.frombuffer(raw, dtype=dtype, count=numel)
      self._storages[key] = _Storage(array.astype(array.dtype.newbyteorder("=")))
    return self._storages[key]


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
      raise ValueError(f"{path}: a zip file without data.pkl is not a PyTorch checkpoint")
    prefix = pkl[0].rsplit("/", 1)[0] if "/" in pkl[0] else ""
    order = f"{prefix}/byteorder"
    little = archive.read(order).decode().strip() != "big" if order in names else True
    with archive.open(pkl[0]) as f:
      return _RestrictedUnpickler(f, archive, prefix, path, little).load()


def _load_legacy(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{path} is in PyTorch's legacy (pre-1.6) format, which only torch.load "
                     "reads: pip install -e '.[torch]', or re-save it with a recent "
                     "torch.save") from None
  import argparse  # pylint: disable=g-import-not-at-top
  import contextlib  # pylint: disable=g-import-not-at-top
  # The zip reader's one allowance beyond tensors, granted here too: training checkpoints pickle
  # their flags as an argparse.Namespace, which weights_only refuses by default (torch < 2.5
  # has no safe_globals and keeps refusing).
  allow = getattr(torch.serialization, "safe_globals", None)
  with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
    obj = torch.load(path, map_location="cpu", weights_only=True)
  return _tensors_to_numpy(obj)


def _tensors_to_numpy(obj: Any) -> Any:
  if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch.Tensor
    t = obj.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _tensors_to_numpy(v)) for k, v in obj.items())
  return obj


def load_torch_file(path: str) -> Any:
  """The object a torch.save file holds, every tensor as a numpy array."""
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)


def load_state_dict(path: str, *, prefer: tuple = ("ema", "state_dict", "model")
                    ) -> Dict[str, np.ndarray]:
  """A flat {key: array} from a .safetensors, .pt, .pth or .bin file.

  Training checkpoints that wrap the weights (DiT/SiT's train.py saves {'model', 'ema', 'opt',
  'args'}) are unwrapped: the first key of `prefer` present wins, so the EMA weights, which the
  published samples come from, are taken over the raw ones.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such weight file: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  obj = load_torch_file(path)
  if isinstance(obj, dict):
    for key in prefer:
      if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError(f"{path}: expected a state dict of tensors (or one under "
                     f"{', '.join(repr(k) for k in prefer)}); found {type(obj).__name__} with "
                     f"keys {list(obj)[:5] if isinstance(obj, dict) else '-'}")
  return dict(obj)
