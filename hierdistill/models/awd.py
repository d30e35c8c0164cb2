"""Discriminator heads over token features: the Adaptive Weighted Discriminator (AWD) and the
standard mean-pooling head it is compared with (METHOD.md, stage 2).

The head reads token features taken at several depths of a backbone (the fake velocity
network's blocks, say), for noised real data and noised generator samples at the same t:

  f_i   = sum_l Dense_l(LayerNorm_l(h_{l,i}))             per-token feature, (B, N, hidden)
  s_i   = Dense(1)(SiLU(Dense(hidden)(f_i)))              per-token logit
  a_i   = softmax_i(<q, W_k f_i> / sqrt(hidden) / tau)    'awd': attention pooling, learned query q
  a_i   = 1 / N                                           'mean': the standard head
  D     = sum_i a_i s_i

The paper publishes the idea (token weights that "focus on local imperfections") but not the
head; this form is our design. The query q starts at zero, so a new AWD head weights tokens
uniformly, i.e. starts as the baseline head, and learns where to look.
Param tree: proj_{l}/{LayerNorm_0, Dense_0} per input layer l, token_mlp_hidden,
token_mlp_logit, and for 'awd' also key/kernel (hidden, hidden) and query (hidden,).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from hierdistill.models.embeddings import Dense

Array = jax.Array
Dtype = Any

POOLINGS = ("awd", "mean")


class TokenProjection(nn.Module):
  """LayerNorm + Dense of one layer's tokens to the head's width."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    """h: (B, N, D_l). Returns (B, N, hidden) float32."""
    # LayerNorm per layer: block outputs of different depths differ in scale by orders of
    # magnitude, and the sum over layers would otherwise be dominated by the deepest.
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)(h)
    return Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype)(h).astype(
        jnp.float32)


class TokenDiscriminatorHead(nn.Module):
  """D = sum_i a_i s_i over tokens, with adaptive ('awd') or uniform ('mean') token weights.

  Fields:
    pooling: 'awd' (attention pooling with a learned query) or 'mean' (a_i = 1/N).
    hidden: width of the per-token features.
    tau: softmax temperature of the AWD weights; large tau -> uniform weights.
    dtype / param_dtype: compute / storage dtypes. Weights and logits are float32 always.
  """
  pooling: str = "awd"
  hidden: int = 256
  tau: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Union[Array, Sequence[Array]]) -> Tuple[Array, Array]:
    """features: list of (B, N, D_l) arrays (same B, N), or one (B, N, D) array.

    Returns (logit (B,) float32, token_weights (B, N) float32, rows summing to 1). The per-token
    logits s (B, N) are also sown as intermediates['token_logits'] (apply with
    mutable=['intermediates'] to read them, e.g. to log where the weights land).
    """
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r}; valid: {POOLINGS}.")
    if not isinstance(features, (list, tuple)):
      features = [features]
    if not features:
      raise ValueError("TokenDiscriminatorHead needs at least one feature array.")
    shapes = {tuple(f.shape[:2]) for f in features}
    if len(shapes) != 1 or any(f.ndim != 3 for f in features):
      raise ValueError(f"Feature arrays must all be (B, N, D_l) with the same B, N; got "
                       f"{[f.shape for f in features]}.")
    b, n = shapes.pop()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    f = sum(TokenProjection(self.hidden, name=f"proj_{l}", **kw)(h)
            for l, h in enumerate(features))
    s = Dense(self.hidden, name="token_mlp_hidden", **kw)(f)
    s = Dense(1, name="token_mlp_logit", **kw)(nn.silu(s))
    s = s[..., 0].astype(jnp.float32)
    self.sow("intermediates", "token_logits", s)

    if self.pooling == "mean":
      a = jnp.full((b, n), 1.0 / n, jnp.float32)
    else:
      q = self.param("query", nn.initializers.zeros, (self.hidden,), self.param_dtype)
      k = Dense(self.hidden, use_bias=False, name="key", **kw)(f).astype(jnp.float32)
      score = jnp.einsum("bnh,h->bn", k, q.astype(jnp.float32)) / jnp.sqrt(float(self.hidden))
      a = jax.nn.softmax(score / self.tau, axis=-1)
    logit = jnp.sum(a * s, axis=-1)
    return logit, a


def token_weight_entropy(a: Array) -> Array:
  """Entropy -sum_i a_i log a_i of token weights, in nats: a (B, N) -> (B,) float32.

  log N for uniform weights (the 'mean' head, or an AWD head that looks everywhere), 0 when
  all weight sits on one token. Zero weights contribute 0 (x log x -> 0).
  """
  a = jnp.asarray(a, jnp.float32)
  return -jnp.sum(jax.scipy.special.xlogy(a, a), axis=-1)
