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

import contextlib
import fcntl
import io
import os
import tempfile

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NAME = "digits8x8"
NUM_CLASSES = 10
SHAPE = (8, 8, 1)
SPLIT_SEED = 20251112
TEST_PER_CLASS = 30
SPLIT_SIZES = {"train": 1497, "test": 300}
# array_record is the format tfds data sources (random access, no tf.data) read.
FILE_FORMAT = "array_record"


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


def _check_writable(data_dir: str) -> None:
  try:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=data_dir):
      pass
  except OSError as e:
    raise PermissionError(f"data_dir {data_dir!r} is not writable ({e.strerror}); "
                          "pass a writable data_dir to build the digits data set.") from None


@contextlib.contextmanager
def _build_lock(data_dir: str):
  """Serialises builds: processes of one job may share data_dir and start together."""
  with open(os.path.join(data_dir, f".{NAME}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds():
  """tfds's own messages about a build (its bold 'Downloading and preparing...' on stdout, and
  warnings about the half-built folder it is filling) would be the only foreign lines on the
  console; the '[data] building' line says what happens. Errors still raise."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def builder(data_dir: str) -> Digits8x8:
  """The builder, prepared under data_dir (built once if absent; a no-op when present)."""
  with _quiet_tfds():
    return _builder(data_dir)


def _builder(data_dir: str) -> Digits8x8:
  data_dir = os.fspath(data_dir)
  b = Digits8x8(data_dir=data_dir)
  if not b.is_prepared():
    _check_writable(data_dir)
    with _build_lock(data_dir):
      b = Digits8x8(data_dir=data_dir)  # Another process may have built it meanwhile.
      if not b.is_prepared():
        print(f"[data] building {NAME} under {data_dir} (once; a few seconds)", flush=True)
        tfds.disable_progress_bar()  # a one-off build of 1,797 images: the bars are noise
        with contextlib.redirect_stdout(io.StringIO()):
          b.download_and_prepare(
              file_format=FILE_FORMAT,
              # Nothing to fetch: never ask GCS for a prepared copy (the machine may be offline).
              download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        b = Digits8x8(data_dir=data_dir)
  return b


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
  source = builder(data_dir).as_data_source(split=split)
  examples = [source[i] for i in range(len(source))]
  order = np.argsort([int(e["index"]) for e in examples])
  images = np.stack([examples[i]["image"] for i in order]).astype(np.float32)
  labels = np.asarray([examples[i]["label"] for i in order], dtype=np.int32)
  return images / 127.5 - 1.0, labels
