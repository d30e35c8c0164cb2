"""The condition c of every network, and its null: class labels or text.

A batch carries `c`, a pytree whose leaves all have the batch as leading axis:
  labels  c = (B,) int32 in [0, K); the null condition is the label K (the label table's last row).
  text    c = {'embeddings': (B, L, D) float, 'mask': (B, L) int32, 1 = a real token}; the null
          condition is the empty prompt's encoding (SANA's negative prompt "", METHOD.md).
Everything that needs the null (classifier-free guidance in training targets, the real score and
the samplers; condition dropout when the teacher trains) asks the run's condition kind, one of
the two classes here, built by the data source. The losses never see conditions.

Why two places drop conditions: labels are dropped by the network's label embedder
(train=True), where the published DiT/SiT layout puts it; captions are dropped here, by the
stage, because the empty prompt's encoding is data, not a parameter of the network.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Condition = Any  # a pytree as described above


def batch_size_of(c: Condition) -> int:
  return jax.tree.leaves(c)[0].shape[0]


class Labels:
  """Class labels 0..K-1; label K is the null (unconditional) condition."""

  kind = "labels"

  def __init__(self, num_classes: int):
    self.num_classes = int(num_classes)

  def null_like(self, c: Condition) -> Condition:
    return jnp.full_like(c, self.num_classes)

  def drop(self, key: Array, c: Condition, rate: float) -> Condition:
    """Unchanged: the network's label embedder drops labels when it is called with
    train=True (models/embeddings.LabelEmbedder), from the same key."""
    del key, rate
    return c

  def example(self, batch_size: int = 1) -> Condition:
    """A placeholder condition of this kind (zeros), for shapes and initialisation."""
    return np.zeros((batch_size,), np.int32)

  def abstract(self, batch_size: int = 1) -> Condition:
    return jax.ShapeDtypeStruct((batch_size,), jnp.int32)

  def describe(self) -> str:
    return f"class labels, {self.num_classes} classes, null label {self.num_classes}"


class Text:
  """Token embeddings with a mask; the null condition is the empty prompt's encoding.

  null_embeddings: (L, D) and null_mask: (L,), the empty prompt as the text encoder gives it
  (a BOS token and padding, for the encoders here: never an all-padding row, whose attention
  would have nothing to attend to).
  """

  kind = "text"

  def __init__(self, null_embeddings: np.ndarray, null_mask: np.ndarray):
    null_embeddings, null_mask = np.asarray(null_embeddings), np.asarray(null_mask)
    if null_embeddings.ndim != 2 or null_mask.shape != null_embeddings.shape[:1]:
      raise ValueError(f"The null text condition must be (L, D) embeddings with an (L,) mask; "
                       f"got {null_embeddings.shape} and {null_mask.shape}.")
    if not null_mask.any():
      raise ValueError("The null text condition has no real token (its mask is all 0); encode "
                       "the empty prompt with its BOS token.")
    self.null_embeddings = null_embeddings.astype(np.float32)
    self.null_mask = null_mask.astype(np.int32)

  @property
  def length(self) -> int:
    return self.null_embeddings.shape[0]

  @property
  def width(self) -> int:
    return self.null_embeddings.shape[1]

  def null_like(self, c: Condition) -> Condition:
    b = batch_size_of(c)
    return {"embeddings": jnp.broadcast_to(jnp.asarray(self.null_embeddings, c["embeddings"].dtype),
                                           (b,) + self.null_embeddings.shape),
            "mask": jnp.broadcast_to(jnp.asarray(self.null_mask, c["mask"].dtype),
                                     (b,) + self.null_mask.shape)}

  def drop(self, key: Array, c: Condition, rate: float) -> Condition:
    """Each caption becomes the empty prompt with probability `rate`, per sample (CFG)."""
    if rate <= 0.0:
      return c
    b = batch_size_of(c)
    dropped = jax.random.bernoulli(key, rate, (b,))
    return jax.tree.map(
        lambda a, n: jnp.where(dropped.reshape((b,) + (1,) * (a.ndim - 1)), n, a),
        c, self.null_like(c))

  def example(self, batch_size: int = 1) -> Condition:
    return {"embeddings": np.broadcast_to(self.null_embeddings,
                                          (batch_size,) + self.null_embeddings.shape).copy(),
            "mask": np.broadcast_to(self.null_mask, (batch_size,) + self.null_mask.shape).copy()}

  def abstract(self, batch_size: int = 1) -> Condition:
    return {"embeddings": jax.ShapeDtypeStruct((batch_size, self.length, self.width),
                                               jnp.float32),
            "mask": jax.ShapeDtypeStruct((batch_size, self.length), jnp.int32)}

  def describe(self) -> str:
    return (f"text, {self.length} tokens of width {self.width}, null = the empty prompt "
            f"({int(self.null_mask.sum())} real token(s))")


def take(c: Condition, index, axis: int = 0) -> Condition:
  """jnp.take on every leaf: row `index` of a (B, rows, ...) condition, and the like."""
  return jax.tree.map(lambda a: jnp.take(a, index, axis=axis), c)


def take_rows(c: Condition, rows) -> Condition:
  """Numpy rows of a host-side condition (eval and grid batches)."""
  return jax.tree.map(lambda a: np.asarray(a)[rows], c)
