"""Conditioning embedders shared by the DiT and the toy MLP: time, interval and class label.

The conditioning of every network here is c = t_emb(t) + y_emb(y) [+ h_emb(t - r)]. The interval
embedder h_emb has the same form as t_emb but its last Dense starts at zero, so a student that
copies a teacher's weights computes exactly the teacher's c (adding an exact 0.0) whatever r is:
u(z, r, t | y) == v(z, t | y) at step 0 of stage 1 (METHOD.md).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from hierdistill import sharding

Array = jax.Array
Dtype = Any

# The Dense layer of every network here (DiT, MLP, discriminator head, these embedders): its
# output, and by the transpose rule that output's cotangent, is pinned to the batch layout when
# traced under a mesh (jax.set_mesh; a plain nn.Dense otherwise). Under FSDP each x W meets the
# 'fsdp' axis on both operands, and XLA's propagation otherwise resolves it by all-gathering the
# global batch's activations instead of the weights (benchmarks/README.md, memory.py). Pinning
# every dot, not only block boundaries, leaves none free to choose that layout.
Dense = functools.partial(nn.Dense, dot_general=sharding.batch_sharded_dot_general())

# DiT's initialisers, so that models trained here start where the published ones did.
EMBEDDING_INIT = nn.initializers.normal(stddev=0.02)


def accumulation_dtype(dtype: Dtype) -> jnp.dtype:
  """The dtype that sums, residual streams and outputs use for a compute dtype: float32, or
  float64 for a float64 model (so x64 finite-difference checks stay exact)."""
  return jnp.promote_types(dtype, jnp.float32)


def to_float(x: Array) -> Array:
  """Times and intervals as float32 at least (ints and bfloat16 are promoted, float64 kept)."""
  x = jnp.asarray(x)
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  return x.astype(accumulation_dtype(dtype))


def timestep_embedding(s: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal frequency embedding of a scalar per sample (DiT/ADM layout: [cos | sin]).

  s: (B,) the already-mapped embedding input (e.g. 1000 t for a DiT). Returns (B, dim) float32
  (float64 for float64 input).
  Frequencies are max_period^(-k / (dim // 2)), k = 0 .. dim // 2 - 1; the cos half comes first,
  as in DiT, so imported checkpoints read the same features.
  """
  s = to_float(s)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=s.dtype) / half)
  args = s[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """Frequency embedding -> Dense -> SiLU -> Dense (DiT's TimestepEmbedder).

  Params: mlp_0/{kernel (F, D), bias}, mlp_2/{kernel (D, D), bias} (the names of DiT's
  `mlp.0` / `mlp.2`, so importers map them one to one).
  """
  hidden_size: int
  frequency_size: int = 256
  # True for the interval embedder: its output is exactly 0 at init (see the module docstring).
  zero_init_output: bool = False
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, s: Array) -> Array:
    """s: (B,) embedding input (already scaled). Returns (B, hidden_size) in
    accumulation_dtype(dtype): float32 (float64 for a float64 model)."""
    h = timestep_embedding(s, self.frequency_size)
    h = Dense(self.hidden_size, kernel_init=EMBEDDING_INIT, dtype=self.dtype,
              param_dtype=self.param_dtype, name="mlp_0")(h)
    h = nn.silu(h)
    out_init = nn.initializers.zeros if self.zero_init_output else EMBEDDING_INIT
    h = Dense(self.hidden_size, kernel_init=out_init, bias_init=nn.initializers.zeros,
              dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_2")(h)
    # float32 so that the sum of embeddings (and so the teacher == student identity) does not
    # depend on the compute dtype's rounding of each term.
    return h.astype(accumulation_dtype(self.dtype))


class LabelEmbedder(nn.Module):
  """Class-label table with a null row (index num_classes) and label dropout for CFG training.

  Params: embedding_table/embedding (num_classes + 1, D).
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float = 0.1
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Optional[Array], batch_size: int, train: bool = False) -> Array:
    """y: (B,) int labels in [0, num_classes], num_classes = null; None means all null.

    With train=True each label becomes the null label with probability dropout_prob, drawn per
    sample from the 'dropout' rng stream. Returns (B, hidden_size) in accumulation_dtype(dtype).
    """
    if y is None:
      y = jnp.full((batch_size,), self.num_classes, jnp.int32)
    y = jnp.asarray(y).astype(jnp.int32)
    if train and self.dropout_prob > 0.0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.dropout_prob, y.shape)
      y = jnp.where(drop, self.num_classes, y)
    table = nn.Embed(self.num_classes + 1, self.hidden_size, embedding_init=EMBEDDING_INIT,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="embedding_table")
    return table(y).astype(accumulation_dtype(self.dtype))


def interval_of(r: Optional[Array], t: Array) -> Array:
  """h = t - r, the interval the mean velocity averages over; r = None means r = t (h = 0)."""
  t = to_float(t)
  if r is None:
    return jnp.zeros_like(t)
  return t - to_float(r)
