"""Building a tfds set from local files, once, and reading a split of it back in a fixed order.

The embedded sets (data/digits.py, data/fashion_mnist.py) are tfds builders whose examples come
from files on this machine, never a download. What they share lives here: the build runs once
per data dir, under a file lock (the processes of one job may share a data dir and start
together), after checking that the dir is writable, with tfds's console chatter silenced; a
split is read back through a tfds data source (no TensorFlow) and put in the order of the
examples' stored `index`, since tfds stores examples in the order of a hash of their keys.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
from typing import Callable, Optional

import numpy as np
import tensorflow_datasets as tfds

# array_record is the format tfds data sources (random access, no tf.data) read.
FILE_FORMAT = "array_record"


def _check_writable(data_dir: str, what: str) -> None:
  """PermissionError (one line) unless data_dir exists or can be made, and takes a file."""
  try:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=data_dir):
      pass
  except OSError as e:
    raise PermissionError(f"data_dir {data_dir!r} is not writable ({e.strerror}); "
                          f"pass a writable data_dir to build {what}.") from None


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str):
  """Serialises builds of data set `name` under data_dir."""
  with open(os.path.join(data_dir, f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds():
  """tfds's own messages about a build (its bold 'Downloading and preparing...' on stdout, and
  warnings about the half-built folder it is filling) would be the only foreign lines on the
  console; the caller's '[data] building' line says what happens. Errors still raise."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def prepared(builder_cls: Callable[..., tfds.core.DatasetBuilder], data_dir: str, *, name: str,
             what: str, message: str, check_sources: Optional[Callable[[], None]] = None):
  """builder_cls's builder under data_dir, built first if absent (once, whoever asks first).

  what: the set's name in the unwritable-dir error; message: the '[data] building' line;
  check_sources: called before anything is locked or written, to fail early on absent or
  malformed source files.
  """
  data_dir = os.fspath(data_dir)
  with _quiet_tfds():
    b = builder_cls(data_dir=data_dir)
    if b.is_prepared():
      return b
    if check_sources is not None:
      check_sources()
    _check_writable(data_dir, what)
    with _build_lock(data_dir, name):
      b = builder_cls(data_dir=data_dir)  # Another process may have built it meanwhile.
      if not b.is_prepared():
        print(message, flush=True)
        tfds.disable_progress_bar()  # a one-off local build: the bars are noise
        with contextlib.redirect_stdout(io.StringIO()):
          b.download_and_prepare(
              file_format=FILE_FORMAT,
              # Nothing to fetch: never ask GCS for a prepared copy (the machine may be offline).
              download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        b = builder_cls(data_dir=data_dir)
  return b


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A split in memory, in the order of the examples' `index` feature.

  Returns images float32 in [-1, 1] (from uint8) and labels int32.
  """
  source = builder.as_data_source(split=split)
  # One batched read: 60,000 single reads cost seconds more.
  examples = source.__getitems__(list(range(len(source))))
  order = np.argsort(np.asarray([int(e["index"]) for e in examples], np.int64))
  images = np.stack([examples[i]["image"] for i in order]).astype(np.float32)
  labels = np.asarray([examples[i]["label"] for i in order], dtype=np.int32)
  return images / 127.5 - 1.0, labels
