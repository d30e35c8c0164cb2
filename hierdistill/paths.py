"""The probability path and its samplers: where on [0, 1] each loss looks, and guidance.

t = 1 is pure noise, t = 0 is data (METHOD.md). All samplers draw per sample, never by batch
index: under a sharded jit, index ranges land on whole devices and every device would see one
kind of (r, t) only.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill.losses import guided_velocity, interpolate  # noqa: F401  (re-exported)

Array = jax.Array


def sample_logit_normal(key: Array, shape: Sequence[int], mu: float = 0.0,
                        sigma: float = 1.0) -> Array:
  """t = sigmoid(mu + sigma n), n ~ N(0, 1): the time density of SD3/SiT-style flow training."""
  return jax.nn.sigmoid(mu + sigma * jax.random.normal(key, shape, jnp.float32))


def sample_t(key: Array, batch_size: int, *, mu: float = 0.0, sigma: float = 1.0) -> Array:
  """One logit-normal time per sample, shape (B,)."""
  return sample_logit_normal(key, (batch_size,), mu, sigma)


def sample_r_t(key: Array, batch_size: int, *, mu: float = -0.4, sigma: float = 1.0,
               equal_fraction: float = 0.75):
  """The (r, t) pairs of MeanFlow: r <= t, both (B,).

  Two logit-normal(mu, sigma) draws, t = max and r = min; then, for each sample independently
  with probability `equal_fraction`, r = t (plain flow matching on the instantaneous velocity,
  which MeanFlow found necessary for stability; 75% by default).
  """
  if not 0.0 <= equal_fraction <= 1.0:
    raise ValueError(f"equal_fraction must lie in [0, 1], got {equal_fraction}.")
  k_draws, k_equal = jax.random.split(key)
  draws = sample_logit_normal(k_draws, (2, batch_size), mu, sigma)
  t = jnp.max(draws, axis=0)
  r = jnp.min(draws, axis=0)
  equal = jax.random.bernoulli(k_equal, equal_fraction, (batch_size,))
  return jnp.where(equal, t, r), t


def guidance_scale(t: Array, w: float, interval: Optional[Sequence[float]] = None) -> Array:
  """Per-sample CFG scale: w where t lies in the guidance interval [t_lo, t_hi], else 1.

  With interval=None, w everywhere. Returns float32 shaped like t.
  """
  t = jnp.asarray(t, jnp.float32)
  w_t = jnp.full_like(t, w)
  if interval is None:
    return w_t
  t_lo, t_hi = interval
  return jnp.where((t >= t_lo) & (t <= t_hi), w_t, 1.0)


def pair_rows(a: Array, b: Array) -> Array:
  """(B, ...) and (B, ...) -> (2B, ...) with rows a_0, b_0, a_1, b_1, ...

  Why interleave rather than concatenate: with the batch sharded over devices, row i's pair
  stays on row i's device, where jnp.concatenate([a, b]) would move half of each to another
  device (XLA all-gathers the batch for it). unpair_rows undoes it.
  """
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def unpair_rows(ab: Array) -> tuple[Array, Array]:
  """The inverse of pair_rows: (2B, ...) -> ((B, ...), (B, ...))."""
  ab = ab.reshape((ab.shape[0] // 2, 2) + ab.shape[1:])
  return ab[:, 0], ab[:, 1]


def cfg_velocity(v_fn: Callable[[Array, Array, Any], Array], z: Array, t: Array, c: Any, *,
                 w: float, null: Any, interval: Optional[Sequence[float]] = None,
                 guided_channels: Optional[int] = None) -> Array:
  """The guided velocity v_w(z, t | c) = v(z, t | null) + w (v(z, t | c) - v(z, t | null)).

  v_fn(z, t, c) -> v. c: the condition, a pytree with the batch as leading axis of every leaf
  (class labels (B,), or text embeddings and mask: conditions.py). null: the null condition,
  the same pytree (e.g. conditions.Labels(K).null_like(c)); a plain int is taken as the null
  label for every row. The conditional and unconditional passes go through the model as one
  batch of 2B, which is one large matmul instead of two small ones. With w == 1 (no guidance)
  the unconditional pass is skipped. Outside the guidance interval the scale is 1.
  guided_channels: guide only the first this many channels (last axis) and keep the
  conditional velocity in the rest. DiT's and SiT's samplers guide 3 of the 4 latent channels
  (their forward_with_cfg); their published FIDs need it. None: all channels.
  """
  if w == 1.0:
    return v_fn(z, t, c).astype(jnp.float32)
  if isinstance(null, (int, np.integer)):
    null = jnp.full_like(c, null)
  paired = jax.tree.map(pair_rows, c, null)
  v_cond, v_uncond = unpair_rows(v_fn(pair_rows(z, z), pair_rows(t, t), paired))
  guided = guided_velocity(v_cond, v_uncond, guidance_scale(t, w, interval))
  if guided_channels is None:
    return guided
  return jnp.concatenate([guided[..., :guided_channels],
                          v_cond[..., guided_channels:].astype(guided.dtype)], axis=-1)
