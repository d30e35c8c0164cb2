"""The losses of Hierarchical Distillation, as pure functions of arrays and callables.

This module imports nothing but JAX, so other codebases can use it with their own models:

    from hierdistill import losses
    loss, metrics = losses.meanflow_loss(u_fn, z_t, r, t, v_teacher)

Conventions (METHOD.md): data x, noise e ~ N(0, I), t in [0, 1] with t = 1 pure noise,
z_t = (1 - t) x + t e, velocity v = e - x, mean velocity u(z_t, r, t) over [r, t] with
z_r = z_t - (t - r) u. Time arrays have shape (B,) and broadcast over the other axes, so
batches may be images (B, H, W, C) or vectors (B, D). Every loss returns (loss, metrics): a
scalar and a dict of scalars for logging. Inputs in bfloat16 are computed in float32.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]  # v_fn(z, t) -> v
MeanVelocityFn = Callable[[Array, Array, Array], Array]  # u_fn(z, r, t) -> u


def _f32(x: Array) -> Array:
  """Promotes low-precision floats to float32; losses are always reduced in float32."""
  x = jnp.asarray(x)
  return x.astype(jnp.float32) if x.dtype != jnp.float64 else x


def _per_sample(t: Array, like: Array) -> Array:
  """Reshapes a (B,) array to (B, 1, ..., 1) so it broadcasts against `like`."""
  return jnp.reshape(t, t.shape + (1,) * (like.ndim - t.ndim))


def _sum_per_sample(x: Array) -> Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _mean_per_sample(x: Array) -> Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def interpolate(x: Array, noise: Array, t: Array) -> Array:
  """z_t = (1 - t) x + t e: the linear path, data at t = 0 and noise at t = 1.

  x, noise: (B, ...); t: (B,). Returns z_t in the promoted dtype of the inputs.
  """
  t = _per_sample(jnp.asarray(t), x)
  return (1.0 - t) * x + t * noise


def flow_matching_loss(v_fn: VelocityFn, x: Array, noise: Array, t: Array):
  """Flow matching: L = mean over all elements of (v_fn(z_t, t) - (e - x))^2.

  v_fn(z, t) -> velocity shaped like z; x, noise: (B, ...); t: (B,).
  """
  x, noise, t = _f32(x), _f32(noise), _f32(t)
  z_t = interpolate(x, noise, t)
  v_target = noise - x
  err = _f32(v_fn(z_t, t)) - v_target
  loss = jnp.mean(jnp.square(err))
  return loss, {"flow_matching_mse": loss}


def meanflow_target(u_fn: MeanVelocityFn, z_t: Array, r: Array, t: Array, v: Array):
  """The MeanFlow identity u = v - (t - r) du/dt turned into a regression target.

  du/dt is the total derivative along the trajectory, du/dt = v . d_z u + d_t u (r held fixed),
  obtained with ONE forward-mode product: jax.jvp(u_fn, (z_t, r, t), (v, 0, 1)).

  u_fn(z, r, t) -> u shaped like z; z_t, v: (B, ...); r, t: (B,).
  Returns (u, u_tgt): u = u_fn(z_t, r, t) (differentiable w.r.t. whatever u_fn closes over) and
  u_tgt = sg(v - (t - r) du/dt), both float32.
  """
  z_t, r, t, v = _f32(z_t), _f32(r), _f32(t), _f32(v)
  u, du_dt = jax.jvp(
      lambda z, r_, t_: _f32(u_fn(z, r_, t_)),
      (z_t, r, t),
      (v, jnp.zeros_like(r), jnp.ones_like(t)),
  )
  u_tgt = sg(v - _per_sample(t - r, z_t) * du_dt)
  return u, u_tgt


def adaptive_weighted_loss(d: Array, *, p: float = 1.0, eps: float = 1e-3):
  """MeanFlow's adaptive weighting: mean over batch of sg(1 / (d + eps)^p) * d.

  d: (B,) per-sample squared errors. With p = 1 the value sits near 1 however good the model is
  (the gradient is d's, rescaled per sample): log d itself, not only this loss.
  eps is the paper's c: the MeanFlow paper gives c = 1e-3 as its example value (METHOD.md takes
  it), while the official MeanFlow JAX code's default config sets norm_eps = 0.01. c only matters
  for samples already fitted to d ~ c, whose weight it caps at 1/c. We keep the paper's 1e-3,
  with which this project's tables were measured; pass eps=0.01 (config key adaptive_eps) to
  match the official code.
  """
  w = sg(1.0 / jnp.power(d + eps, p))
  return jnp.mean(w * d)


def meanflow_loss(u_fn: MeanVelocityFn, z_t: Array, r: Array, t: Array, v: Array, *,
                  p: float = 1.0, eps: float = 1e-3):
  """MeanFlow loss: d = per-sample sum of (u - u_tgt)^2, L = mean_b sg(1/(d + eps)^p) d.

  u_fn(z, r, t) -> u; z_t, v: (B, ...) with v the target instantaneous velocity at z_t (for
  distillation, the teacher's guided velocity); r, t: (B,) with r <= t.
  Metrics: the weighted loss, the mean raw error d and the mean per-element squared error.
  """
  u, u_tgt = meanflow_target(u_fn, z_t, r, t, v)
  d = _sum_per_sample(jnp.square(u - u_tgt))
  loss = adaptive_weighted_loss(d, p=p, eps=eps)
  return loss, {
      "meanflow_loss": loss,
      "meanflow_sq_error": jnp.mean(d),
      "meanflow_mse": jnp.mean(d) / (u.size // u.shape[0]),
  }


def dmd_loss(x: Array, x_real: Array, x_fake: Array):
  """Distribution matching (DMD2): a surrogate whose gradient is the DMD direction.

  g = (x_fake - x_real) / n with the per-sample normaliser n = mean over non-batch dims of
  |x - x_real|; L = 0.5 * mean((x - sg(x - g))^2), hence dL/dx = g / x.size.
  x: generator samples (B, ...), differentiable; x_real, x_fake: denoised estimates of the noised
  x by the real (teacher) and fake score, treated as constants. Where n = 0 the direction is set
  to 0 (every non-finite entry of g becomes 0). DMD2 differs there: its torch.nan_to_num maps
  0/0 to 0 but x/0 (x != 0) to the largest finite float, so its loss becomes inf; n = 0 means
  the sample equals the teacher's estimate, where no push is the sensible direction.
  """
  x, x_real, x_fake = _f32(x), sg(_f32(x_real)), sg(_f32(x_fake))
  n = _mean_per_sample(jnp.abs(x - x_real))
  g = (x_fake - x_real) / _per_sample(n, x)
  g = sg(jnp.where(jnp.isfinite(g), g, 0.0))
  loss = 0.5 * jnp.mean(jnp.square(x - sg(x - g)))
  return loss, {
      "dmd_loss": loss,
      "dmd_direction_rms": jnp.sqrt(jnp.mean(jnp.square(g))),
      "dmd_normaliser": jnp.mean(n),
  }


def discriminator_loss(logits_real: Array, logits_fake: Array):
  """Non-saturating GAN loss of the discriminator: mean softplus(-D(real)) + mean softplus(D(fake)).

  logits_real, logits_fake: (B,) (any shape; all elements are averaged).
  """
  logits_real, logits_fake = _f32(logits_real), _f32(logits_fake)
  loss = jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake))
  return loss, {
      "disc_loss": loss,
      "disc_logit_real": jnp.mean(logits_real),
      "disc_logit_fake": jnp.mean(logits_fake),
      # Share of samples the discriminator classifies right: near 1 means G gets no signal.
      "disc_accuracy": 0.5 * (jnp.mean(logits_real > 0) + jnp.mean(logits_fake < 0)),
  }


def generator_adversarial_loss(logits_fake: Array):
  """Non-saturating GAN loss of the generator: mean softplus(-D(G(e))).  logits_fake: (B,)."""
  logits_fake = _f32(logits_fake)
  loss = jnp.mean(jax.nn.softplus(-logits_fake))
  return loss, {"gen_adv_loss": loss}


def guided_velocity(v_cond: Array, v_uncond: Array, w) -> Array:
  """Classifier-free guidance: v_w = v_uncond + w (v_cond - v_uncond).

  v_cond, v_uncond: (B, ...); w: a scalar or a (B,) array (per-sample scale, e.g. 1 outside a
  guidance interval). Returns float32.
  """
  v_cond, v_uncond = _f32(v_cond), _f32(v_uncond)
  w = jnp.asarray(w, jnp.float32)
  if w.ndim:
    w = _per_sample(w, v_cond)
  return v_uncond + w * (v_cond - v_uncond)
