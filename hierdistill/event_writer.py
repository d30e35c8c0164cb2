"""TensorBoard event files without TensorFlow: the run's metric writer.

clu's default writer writes through tf.summary, and importing TensorFlow was most of a launch's
start-up time (about 10 s of a 2-core machine, README) and put TensorFlow's and oneDNN's log
lines on the console. TensorBoard reads the same files when they are written record by record
with its own pure-Python RecordWriter: scalars as simple values, images as PNG-encoded image
summaries. (TensorBoard's EventFileWriter would import TensorFlow again, for tf.io.gfile, when
TensorFlow is installed, as it is here for tfds.) Events are written when they come, a few a
report, and flushed at once, so a killed run keeps what it logged.

The interface is the part of clu's MetricWriter the chain uses (write_scalars, write_images,
flush, close), so a clu writer can still be passed to pipeline.Chain(writer=...).
"""
from __future__ import annotations

import io
import os
import socket
import time
from typing import Mapping

import numpy as np


class EventWriter:
  """Writes scalars and images to a new TensorBoard event file under `logdir`."""

  def __init__(self, logdir: str):
    # Imported here: `hierdistill.event_writer` costs nothing until a run writes.
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    # TensorBoard's file name: it reads files whose names hold "tfevents".
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}."
                             f"{socket.gethostname()}.{os.getpid()}.hierdistill")
    self._records = RecordWriter(open(self.path, "wb"))  # pylint: disable=consider-using-with
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def _add(self, step: int, values: list) -> None:
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=self._summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One simple value per key, e.g. {'teacher/loss': 0.5}."""
    value = self._summary_pb2.Summary.Value
    self._add(step, [value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Images as PNGs; each array (N, H, W, C) or (H, W, C), uint8 (or floats in [0, 1]),
    C in 1, 3, 4. The first image of a batch is written (a grid arrives as one image)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    summary = self._summary_pb2.Summary
    values = []
    for tag, array in images.items():
      a = np.asarray(array)
      a = a[0] if a.ndim == 4 else a
      if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
      h, w, c = a.shape
      buf = io.BytesIO()
      Image.fromarray(a[..., 0] if c == 1 else a).save(buf, format="PNG")
      values.append(summary.Value(tag=tag, image=summary.Image(
          height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())))
    self._add(step, values)

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    if not self._records.closed:
      self._records.close()


class NullWriter:
  """What processes other than 0 write: nothing (process 0 writes the run's events)."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass

  def close(self):
    pass
