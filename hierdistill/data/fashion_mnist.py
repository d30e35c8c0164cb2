"""Fashion-MNIST (Zalando, MIT licence) as a local tfds data set: 28x28 grey images of clothes.

70,000 images in 10 classes with the publisher's own split, 60,000 train / 10,000 test. A
richer miniature than the 8x8 digits: 49 tokens at patch 4, and texture (knits, prints, straps)
that a one-step sketch blurs and distribution matching has to restore.

Where the files come from: the four IDX files as the publisher ships them (gzip), in the
directory $FASHION_MNIST_DIR, else DEFAULT_DIR, where Debian's package `dataset-fashion-mnist`
installs them (`apt-get install dataset-fashion-mnist`). They are read once, to build the tfds
set under the data dir; a built set needs them no more. Tests point FASHION_MNIST_DIR at a tiny
mock they write.

Stored features, as data/digits.py stores its own (why there): image (28, 28, 1) uint8 as a
tfds Tensor (no PNG, so building and reading never import TensorFlow); label ClassLabel(10) with
the publisher's class names; index int32, the example's row in its IDX file, so that a split
read back is put in the publisher's order (tfds stores examples in the order of a key hash).
"""
from __future__ import annotations

import gzip
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from hierdistill.config_checks import ConfigError
from hierdistill.data import local_build

NAME = "fashion_mnist"
NUM_CLASSES = 10
SHAPE = (28, 28, 1)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
SPLIT_SIZES = {"train": 60000, "test": 10000}
# The publisher's file names; 't10k' is its test split.
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DIR_ENV = "FASHION_MNIST_DIR"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
# IDX magic numbers: 0x08 = unsigned bytes, then the number of dimensions.
_IDX_UBYTE_3D, _IDX_UBYTE_1D = 0x00000803, 0x00000801


def source_dir() -> str:
  """The directory of the IDX files: $FASHION_MNIST_DIR, else Debian's install directory."""
  return os.environ.get(DIR_ENV) or DEFAULT_DIR


def _read_idx(path: str, magic: int, dims: int) -> np.ndarray:
  """One gzipped IDX file as a uint8 array; ConfigError (one line) when it is not one."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # not gzip, truncated, unreadable
    raise ConfigError(f"{path} is not a readable gzipped IDX file ({e}); reinstall "
                      "dataset-fashion-mnist or replace the file.") from None
  header = 4 + 4 * dims
  if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
    raise ConfigError(f"{path} is not an IDX file of {dims}-D unsigned bytes (bad header); "
                      "reinstall dataset-fashion-mnist or replace the file.")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
  if len(raw) - header != int(np.prod(shape)):
    raise ConfigError(f"{path} holds {len(raw) - header} bytes of data but its header "
                      f"promises {shape}; reinstall dataset-fashion-mnist or replace the file.")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_split(split: str, directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A split straight from the IDX files: images uint8 (N, 28, 28, 1), labels int32 (N,).

  ConfigError (one line) when a file is absent or malformed.
  """
  directory = directory or source_dir()
  image_file, label_file = FILES[split]
  missing = [f for f in FILES[split] if not os.path.isfile(os.path.join(directory, f))]
  if missing:
    raise ConfigError(
        f"Fashion-MNIST not found in {directory} (no {missing[0]}): install it with "
        f"`apt-get install dataset-fashion-mnist` (MIT licence) or point {DIR_ENV} at its "
        "IDX files.")
  images = _read_idx(os.path.join(directory, image_file), _IDX_UBYTE_3D, 3)
  labels = _read_idx(os.path.join(directory, label_file), _IDX_UBYTE_1D, 1)
  if images.shape[1:] != SHAPE[:2]:
    raise ConfigError(f"{os.path.join(directory, image_file)} holds {images.shape[1]}x"
                      f"{images.shape[2]} images, not 28x28; point {DIR_ENV} at Fashion-MNIST.")
  if len(images) != len(labels):
    raise ConfigError(f"{directory}: {len(images)} {split} images but {len(labels)} labels; "
                      "reinstall dataset-fashion-mnist or replace the files.")
  if labels.size and labels.max() >= NUM_CLASSES:
    raise ConfigError(f"{os.path.join(directory, label_file)} has label {labels.max()}, "
                      f"outside 0..{NUM_CLASSES - 1}; point {DIR_ENV} at Fashion-MNIST.")
  return images[..., None], labels.astype(np.int32)


class FashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST, 28x28x1, 10 classes, the publisher's 60,000 / 10,000 split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The publisher's split, built from the IDX files."}
  code_path = epath.Path(__file__)  # see data/digits.py

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "index": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Read from local files, never downloaded.
    # Both splits are read (and checked) before anything is written.
    return {split: self._generate_examples(*read_split(split)) for split in FILES}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label), "index": i}


def builder(data_dir: str) -> FashionMnist:
  """The builder, prepared under data_dir (built once from the IDX files if absent)."""

  def check_sources():  # absent or malformed files: say so before locking or writing
    for split in FILES:
      read_split(split)

  return local_build.prepared(
      FashionMnist, data_dir, name=NAME, what="Fashion-MNIST", check_sources=check_sources,
      message=f"[data] building {NAME} from {source_dir()} under {data_dir} (once)")


def load_split(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a split into memory, building the data set first if absent.

  Returns:
    images: float32 (N, 28, 28, 1) in [-1, 1]; labels: int32 (N,), in the publisher's order.
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
  return local_build.read_split(builder(data_dir), split)
