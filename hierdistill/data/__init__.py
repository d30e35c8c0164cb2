"""Embedded data sets and the deterministic input pipeline.

Every data set comes as an `ArrayDataset`: numpy arrays in memory plus the metadata a model
needs. Images are NHWC float32 in [-1, 1]; toy 2-D points are float32 (N, 2); labels are int32
in [0, num_classes).

    ds = data.load_dataset("digits8x8", "train", data_dir=...)
    pipe = data.InMemoryPipeline(ds.x, ds.y, global_batch_size=64, seed=0,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    batch = pipe.batch(step)  # dict(x=..., c=...), this process's rows

tensorflow_datasets is imported only when the digits or Fashion-MNIST are asked for.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hierdistill.data import toy2d
from hierdistill.data.pipeline import InMemoryPipeline

# The sets load_dataset holds in memory (imagenet256_latents is read from its shards by
# data/imagenet_latents.py; sources/ lists every data source a run can name).
DATASETS = ("digits8x8", "fashion_mnist") + toy2d.NAMES


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A data set held in memory.

  x: (N, *shape) float32; y: int32 (N,); shape: one example's shape, e.g. (8, 8, 1) or (2,).
  """
  name: str
  x: np.ndarray
  y: np.ndarray
  num_classes: int
  shape: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.x)


def load_dataset(name: str, split: str = "train", data_dir: str | None = None,
                 seed: int = 0) -> ArrayDataset:
  """Loads an embedded data set by name.

  Args:
    name: 'digits8x8', 'fashion_mnist', '8gaussians' or '25gaussians'.
    split: 'train' or 'test'. Toy sets draw their test split from another seed.
    data_dir: tfds data dir for the image sets (built there on first use); unused by toy sets.
      Fashion-MNIST is built from the IDX files in $FASHION_MNIST_DIR (data/fashion_mnist.py).
    seed: the toy sets' training seed (their test split uses seed + 1); unused by the digits.
  """
  if name == "digits8x8":
    if data_dir is None:
      raise ValueError("the digits need a data_dir to be built in")
    from hierdistill.data import digits  # pylint: disable=g-import-not-at-top

    x, y = digits.load_digits_split(split, data_dir)
    return ArrayDataset(name, x, y, digits.NUM_CLASSES, digits.SHAPE)
  if name == "fashion_mnist":
    if data_dir is None:
      raise ValueError("Fashion-MNIST needs a data_dir to be built in")
    from hierdistill.data import fashion_mnist  # pylint: disable=g-import-not-at-top

    x, y = fashion_mnist.load_split(split, data_dir)
    return ArrayDataset(name, x, y, fashion_mnist.NUM_CLASSES, fashion_mnist.SHAPE)
  if name in toy2d.NAMES:
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = toy2d.load_toy2d(name, seed=seed if split == "train" else seed + 1)
    return ArrayDataset(name, x, y, toy2d.num_classes(name), (2,))
  raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


def load_digits_split(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """See digits.load_digits_split; here so that importing the package stays light."""
  from hierdistill.data import digits  # pylint: disable=g-import-not-at-top

  return digits.load_digits_split(split, data_dir)


__all__ = ["ArrayDataset", "DATASETS", "InMemoryPipeline", "load_dataset",
           "load_digits_split", "toy2d"]
