"""The 8x8 handwritten digits of scikit-learn as a tfds data set with a fixed train/test split.

The 1,797 images ship inside scikit-learn, so building needs no download and takes seconds.

Split [ours]: stratified and seeded. Within each class, the sklearn indices are permuted with
np.random.default_rng([SPLIT_SEED, class]) and the first TEST_PER_CLASS go to 'test', the rest to
'train': 10 x 30 = 300 test, 1,497 train. The split depends only on these constants, never on
the machine, so every build (and every process) gets the same split.

Stored features: image (8, 8, 1) uint8 = round(v * 255 / 16) of the sklearn values v in 0..16;
label ClassLabel(10); index int32, the example's row in sklearn's array, so that a split read back
is put in a canonical order (tfds shuffles the stored order by a hash of the keys). The image is a
tfds Tensor feature, not an Image feature: PNG-encoding 64 pixels saves nothing, and tfds encodes
PNG through TensorFlow, whose import alone took 8 of the 11 s of a build. Stored as array_record,
read through a tfds data source: building and reading never import TensorFlow.

Importing this module imports tensorflow_datasets; `hierdistill.data` imports it only on demand.
"""
from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from hierdistill.data import local_build

NAME = "digits8x8"
NUM_CLASSES = 10
SHAPE = (8, 8, 1)
SPLIT_SEED = 20251112
TEST_PER_CLASS = 30
SPLIT_SIZES = {"train": 1497, "test": 300}


def split_indices() -> dict[str, np.ndarray]:
  """The fixed stratified split: {'train': indices, 'test': indices} into sklearn's arrays.

  Indices are sorted ascending; sizes are SPLIT_SIZES.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  target = load_digits().target
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(target == c)
    # One generator per class: adding a class never reshuffles the others.
    perm = np.random.default_rng([SPLIT_SEED, c]).permutation(members)
    test.append(perm[:TEST_PER_CLASS])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(target)), test)
  return {"train": train, "test": test}


class Digits8x8(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits (UCI optdigits test set), 1,797 images, 10 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified seeded split: 1,497 train / 300 test."}
  # tfds 4.9 derives this path through `importlib_resources`, a package it declares only for
  # Python < 3.9, and fails without it; the builder's code is this file, so say so directly.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    for i in indices:
      # sklearn stores ink intensities 0..16; spread them over the uint8 range.
      image = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)[..., None]
      yield int(i), {"image": image, "label": int(digits.target[i]), "index": int(i)}


def builder(data_dir: str) -> Digits8x8:
  """The builder, prepared under data_dir (built once if absent; a no-op when present)."""
  return local_build.prepared(
      Digits8x8, data_dir, name=NAME, what="the digits data set",
      message=f"[data] building {NAME} under {data_dir} (once; a few seconds)")


def load_digits_split(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a split into memory, building the data set first if absent.

  Args:
    split: 'train' or 'test'.
    data_dir: the tfds data dir; the data set lives in <data_dir>/digits8x8/<version>.
  Returns:
    images: float32 (N, 8, 8, 1) in [-1, 1]; labels: int32 (N,), ordered by sklearn index.
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
  return local_build.read_split(builder(data_dir), split)
