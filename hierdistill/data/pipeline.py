"""A deterministic, index-based input pipeline over in-memory arrays, so that resume is exact.

The order of examples is a pure function of (seed, step): the data are read as an endless stream
of epochs, epoch e being the permutation np.random.default_rng([seed, e]).permutation(N), and the
global batch at step s is the stream's positions [s * B, (s + 1) * B). A batch may straddle two
epochs; every example appears exactly once per epoch. Hence:
- the iterator state is just the step: a run resumed at step s reads exactly the batches an
  uninterrupted run would have read (checkpoint the train step, nothing else);
- the order does not depend on the number of processes or devices: process p of P takes the
  p-th contiguous slice of B / P rows of the global batch, which is what
  jax.make_array_from_process_local_data expects for a batch sharded over its leading axis on a
  mesh whose devices are ordered by process (as jax.make_mesh orders them).
Nothing is augmented: digits must not be flipped, and toy points have no symmetry to exploit.
"""
from __future__ import annotations

import numpy as np


class InMemoryPipeline:
  """Batches of (x, c) by step, from arrays held in host memory.

  Args:
    images: (N, ...) array, e.g. float32 (N, H, W, C) in [-1, 1] or (N, 2) points.
    conditions: the condition of each example: (N,) int labels, or a dict of (N, ...) arrays
      (text: embeddings and mask; conditions.py).
    global_batch_size: B, the batch over all processes.
    seed: fixes the order of every epoch.
    process_index, process_count: this process among the data-loading processes
      (jax.process_index(), jax.process_count()). B must be divisible by process_count.
  """

  def __init__(self, images, conditions, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    images = np.asarray(images)
    if isinstance(conditions, dict):
      conditions = {k: np.asarray(v) for k, v in conditions.items()}
      counts = {len(v) for v in conditions.values()}
    else:
      conditions = np.asarray(conditions).astype(np.int32)
      counts = {len(conditions)}
    if counts != {len(images)} or len(images) == 0:
      raise ValueError(f"need a condition for each image, and some: {len(images)} images, "
                       f"{sorted(counts)} conditions")
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                       f"process_count {process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.images, self.conditions = images, conditions
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index, self.process_count = process_index, process_count
    self._cached_epoch = (None, None)  # (epoch, permutation): consecutive steps share an epoch.

  @property
  def num_examples(self) -> int:
    return len(self.images)

  @property
  def steps_per_epoch(self) -> float:
    """Epochs are not whole numbers of steps: batches straddle epoch boundaries."""
    return self.num_examples / self.global_batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._cached_epoch[0] != epoch:
      self._cached_epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(
          self.num_examples))
    return self._cached_epoch[1]

  def global_indices(self, step: int) -> np.ndarray:
    """Example indices of the global batch at `step`: int (B,)."""
    n = self.num_examples
    positions = step * self.global_batch_size + np.arange(self.global_batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(self.global_batch_size, dtype=np.int64)
    for e in np.unique(epochs):  # At most a few epochs: one unless B > N.
      sel = epochs == e
      out[sel] = self._permutation(int(e))[offsets[sel]]
    return out

  def local_indices(self, step: int) -> np.ndarray:
    """This process's slice of global_indices(step): int (B / process_count,)."""
    start = self.process_index * self.local_batch_size
    return self.global_indices(step)[start:start + self.local_batch_size]

  def batch(self, step: int) -> dict:
    """The process-local batch at `step`: dict(x=(B / P, ...), c=the rows' conditions)."""
    idx = self.local_indices(step)
    if isinstance(self.conditions, dict):
      c = {k: v[idx] for k, v in self.conditions.items()}
    else:
      c = self.conditions[idx]
    return {"x": self.images[idx], "c": c}

  def __iter__(self):
    return self.iterate(0)

  def iterate(self, start_step: int = 0):
    """Endless batches from start_step on: resuming at step s is iterate(s)."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1
