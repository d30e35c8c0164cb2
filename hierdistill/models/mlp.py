"""A residual MLP velocity network for toy vector data (e.g. 2-D mixtures), with the DiT's API.

Same call signature and the same conditioning rule as the DiT (c = t_emb + y_emb [+ h_emb(t - r)],
h_emb zero at init), so every stage, loss and test written for images runs on toy data, and a
student initialised from a teacher reproduces it exactly. Param tree:

  t_embedder/{mlp_0, mlp_2}, interval_embedder/{mlp_0, mlp_2} (students only, mlp_2 zero at init),
  y_embedder/embedding_table/embedding (K + 1, W), input/{kernel (D, W), bias},
  blocks_{i}/{dense_in, cond, dense_out}/{kernel, bias}, output/{kernel (W, D), bias}.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from hierdistill.models.embeddings import (Dense, LabelEmbedder, TimestepEmbedder,
                                          accumulation_dtype, interval_of, to_float)

Array = jax.Array
Dtype = Any


class ResidualBlock(nn.Module):
  """h + Dense(SiLU(Dense(LN(h)) + Dense(SiLU(c)))): the conditioning enters every block."""
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, c: Array) -> Array:
    """h: (B, W) residual stream (float32), c: (B, W). Returns h's dtype."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    a = Dense(self.width, name="dense_in", **kw)(nn.LayerNorm(dtype=self.dtype)(h))
    a = a + Dense(self.width, name="cond", **kw)(nn.silu(c))
    a = Dense(self.width, name="dense_out", **kw)(nn.silu(a))
    return h + a.astype(h.dtype)


class MLPFlow(nn.Module):
  """Velocity network u(z, r, t | y) on vectors z (B, D).

  Fields:
    width, depth: the residual MLP.
    num_classes: K; labels in [0, K), K = null label (K = 0: unconditional, only the null row).
    class_dropout_prob: label dropout to null when train=True.
    interval_conditioning: True for students (zero-init interval embedder).
    feature_layers: block indices whose outputs return_features gives; None = every block.
    time_scale: the time embedder reads time_scale * t; interval_scale: reads it of t - r.
    frequency_size: sinusoidal features of the embedders.
    dtype / param_dtype: compute / storage dtypes.
  """
  width: int = 256
  depth: int = 4
  num_classes: int = 0
  class_dropout_prob: float = 0.1
  interval_conditioning: bool = False
  feature_layers: Optional[Tuple[int, ...]] = None
  time_scale: float = 1000.0
  interval_scale: float = 1000.0
  frequency_size: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def resolved_feature_layers(self) -> Tuple[int, ...]:
    """feature_layers as non-negative block indices, validated."""
    layers = tuple(range(self.depth)) if self.feature_layers is None else self.feature_layers
    for i in layers:
      if not -self.depth <= i < self.depth:
        raise ValueError(f"feature_layers contains {i}, outside the {self.depth} blocks.")
    return tuple(i % self.depth for i in layers)

  @nn.compact
  def __call__(self, z: Array, r: Optional[Array], t: Array, y: Optional[Array], *,
               train: bool = False, return_features: bool = False
               ) -> Union[Array, Tuple[Array, List[Array]]]:
    """z: (B, D); r, t: (B,) in [0, 1] (r = None means r = t; ignored without
    interval_conditioning); y: (B,) int labels, num_classes = null (None = all null).

    Returns the velocity (B, D) float32, or (velocity, features) with features a list of
    (B, 1, width) float32 block outputs (one token each, so token heads apply unchanged).
    """
    if z.ndim != 2:
      raise ValueError(f"MLPFlow expects z of shape (B, D); got {z.shape}.")
    batch = z.shape[0]
    t = jnp.broadcast_to(to_float(t), (batch,))
    acc = accumulation_dtype(self.dtype)  # float32 (float64 for a float64 model)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    c = TimestepEmbedder(self.width, self.frequency_size, name="t_embedder", **kw)(
        self.time_scale * t)
    c = c + LabelEmbedder(self.num_classes, self.width, self.class_dropout_prob,
                          name="y_embedder", **kw)(y, batch, train)
    if self.interval_conditioning:
      # Zero output at init: a student copied from a teacher computes the teacher's c exactly.
      c = c + TimestepEmbedder(self.width, self.frequency_size, zero_init_output=True,
                               name="interval_embedder", **kw)(
                                   self.interval_scale * interval_of(r, t))

    h = Dense(self.width, name="input", **kw)(z).astype(acc)
    wanted = self.resolved_feature_layers() if return_features else ()
    outputs = []
    for i in range(self.depth):
      h = ResidualBlock(self.width, name=f"blocks_{i}", **kw)(h, c)
      outputs.append(h)
    h = nn.silu(nn.LayerNorm(dtype=self.dtype)(h))
    velocity = Dense(z.shape[-1], name="output", **kw)(h).astype(acc)
    if not return_features:
      return velocity
    return velocity, [outputs[i][:, None, :] for i in wanted]
