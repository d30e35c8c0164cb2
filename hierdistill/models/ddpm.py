"""A DDPM noise predictor read as a velocity on our path (DiT's parameterisation).

Ours: z_t = (1 - t) x + t e, v = e - x, t = 1 noise. DDPM (DiT, ADM's 'linear' schedule):
x_s = sqrt(abar_s) x + sqrt(1 - abar_s) e over discrete steps s in [0, S), and the network
predicts e. The two are the same point up to a scale once their noise-to-signal ratios agree:
  t / (1 - t) = sqrt((1 - abar_s) / abar_s),   x_s = sqrt(abar_s) / (1 - t) z_t.
With eps = eps_fn(x_s, s): x = (z - t eps) / (1 - t), so v = eps - x = (eps - z) / (1 - t).
The map is affine in eps for fixed (z, t): guidance on eps and guidance on v are the same, and
guiding the first channels of one guides the same channels of the other.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

# DiT's diffusion: 1000 steps of ADM's linear beta schedule from 1e-4 to 0.02 [DiT].
DDPM_NUM_STEPS = 1000
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02


def ddpm_alphas_cumprod(num_steps: int = DDPM_NUM_STEPS, beta_start: float = DDPM_BETA_START,
                        beta_end: float = DDPM_BETA_END) -> np.ndarray:
  """abar_s, s = 0 .. num_steps - 1, of a linear beta schedule (DiT's by default)."""
  betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  return np.cumprod(1.0 - betas)


def ddpm_time_of(t, alphas_cumprod: Optional[np.ndarray] = None):
  """(s, scale, t_clipped): the fractional DDPM step s whose noise-to-signal ratio
  sqrt((1 - abar_s) / abar_s) equals t / (1 - t), and the input scale sqrt(abar_s) / (1 - t) so
  that x_s = scale * z_t. t: (B,). t is clipped to [t(0), t(S - 1)], the range the model was
  trained on (t(999) ~ 0.994 for DiT): beyond it the network was never asked. s is interpolated
  linearly in log noise-to-signal between integer steps (DiT's embedder takes fractional
  steps). Works on numpy and jax arrays alike; returns float32 jax arrays.
  """
  abar = np.asarray(ddpm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod,
                    np.float64)
  log_nsr = 0.5 * (np.log1p(-abar) - np.log(abar))  # increasing in s
  t_lo = 1.0 / (1.0 + np.exp(-log_nsr[0]))
  t_hi = 1.0 / (1.0 + np.exp(-log_nsr[-1]))
  t = jnp.clip(jnp.asarray(t, jnp.float32), t_lo, t_hi)
  target = jnp.log(t) - jnp.log1p(-t)
  s = jnp.interp(target, jnp.asarray(log_nsr, jnp.float32),
                 jnp.arange(len(abar), dtype=jnp.float32))
  # sqrt(abar) / (1 - t) with abar = (1 - t)^2 / ((1 - t)^2 + t^2): 1 / sqrt((1 - t)^2 + t^2).
  scale = 1.0 / jnp.sqrt((1.0 - t) ** 2 + t ** 2)
  return s, scale, t


def ddpm_velocity(eps_fn: Callable, z, t, y, alphas_cumprod: Optional[np.ndarray] = None):
  """Our velocity v(z, t | y) = e - x from a DDPM noise predictor eps_fn(x_s, s, y).

  z: (B, H, W, C); t: (B,), clipped to the trained range (see ddpm_time_of); returns
  (eps(x_s, s | y) - z) / (1 - t), (B, H, W, C) float32.
  """
  s, scale, t_c = ddpm_time_of(t, alphas_cumprod)
  expand = lambda a: a.reshape((-1,) + (1,) * (z.ndim - 1))
  eps = eps_fn(z * expand(scale).astype(z.dtype), s, y)
  return (eps.astype(jnp.float32) - z.astype(jnp.float32)) / expand(1.0 - t_c)
