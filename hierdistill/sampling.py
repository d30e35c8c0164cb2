"""Samplers: the teacher's ODE (Euler, Heun, with CFG) and the student's flow map (1 or few steps).

Pure JAX, no Flax: models enter as callables. Time runs from t = 1 (noise) to t = 0 (data) on a
uniform grid t_i = (1 - i / N) t_start + (i / N) t_end, i = 0..N (METHOD.md conventions).

    v_fn(z, t) -> v             instantaneous velocity, z: (B, ...), t: (B,)
    v_fn(z, t, c) -> v          the same, conditional (teacher); c: labels (B,) or a text
                                pytree, batch-leading (conditions.py)
    u_fn(z, r, t) -> u          mean velocity over [r, t] (MeanFlow student), r, t: (B,)

The loops are `jax.lax.fori_loop`s with a Python-int trip count, so every sampler jits with
`num_steps` (and `method`, `cfg_scale`, `cfg_interval`) static, e.g.
`jax.jit(euler_sample, static_argnums=(0, 2))`, and lowers to a scan that reverse-mode
differentiation can go through (a few-step student inside a loss).

The ODE state is integrated in float32 (float64 if the noise is float64) whatever the model's
dtype: a bfloat16 state would lose the small per-step increments of a long sampler.

NFE (network function evaluations) are counted by `teacher_nfe` as forward passes of the network
per sample; see there for the CFG convention.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill.paths import cfg_velocity

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]  # v_fn(z, t) -> v
CondVelocityFn = Callable[[Array, Array, Any], Array]  # v_fn(z, t, c) -> v
MeanVelocityFn = Callable[[Array, Array, Array], Array]  # u_fn(z, r, t) -> u

# Velocity evaluations per step of each ODE method (before CFG doubles the passes).
EVALS_PER_STEP = {"euler": 1, "heun": 2}
METHODS = tuple(EVALS_PER_STEP)


def _check_num_steps(num_steps) -> int:
  """num_steps must be a concrete positive int: it is the trip count of the loop."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(
        f"num_steps must be a Python int >= 1 (static under jit), got {num_steps!r}.")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  return int(num_steps)


def _check_method(method: str) -> str:
  if method not in EVALS_PER_STEP:
    raise ValueError(f"Unknown sampling method {method!r}; choose one of {METHODS}.")
  return method


def _state(noise: Array) -> Array:
  """The ODE state: the noise promoted to at least float32."""
  noise = jnp.asarray(noise)
  return noise.astype(jnp.promote_types(noise.dtype, jnp.float32))


def _grid_time(i, num_steps: int, t_start, t_end, dtype) -> Array:
  """t_i of the uniform grid, a scalar. Written as a convex combination so that t_0 == t_start
  and t_N == t_end exactly (the last step lands on the data, t = 0, with no rounding residue)."""
  frac = jnp.asarray(i, dtype) / num_steps
  return (1.0 - frac) * jnp.asarray(t_start, dtype) + frac * jnp.asarray(t_end, dtype)


def _eval(fn: Callable[..., Array], z: Array, *times: Array) -> Array:
  """Calls a velocity model and casts its output to the state's dtype (the loop carry must keep
  one dtype; models may answer in bfloat16)."""
  out = jnp.asarray(fn(z, *times))
  if out.shape != z.shape:
    raise ValueError(f"The model returned shape {out.shape} for a state of shape {z.shape}.")
  return out.astype(z.dtype)


def _integrate(step: Callable[[Array, Array, Array], Array], noise: Array, num_steps: int,
               t_start, t_end) -> Array:
  """Runs z <- step(z, t_i, t_{i+1}) for i = 0..N-1 from z = noise, with t_i, t_{i+1}: (B,)."""
  num_steps = _check_num_steps(num_steps)
  z0 = _state(noise)
  b, dtype = z0.shape[0], z0.dtype

  def body(i, z):
    t = jnp.full((b,), _grid_time(i, num_steps, t_start, t_end, dtype))
    t_next = jnp.full((b,), _grid_time(i + 1, num_steps, t_start, t_end, dtype))
    return step(z, t, t_next)

  return jax.lax.fori_loop(0, num_steps, body, z0)


def _per_sample(t: Array, like: Array) -> Array:
  """(B,) -> (B, 1, ..., 1), to scale a state of shape (B, ...)."""
  return jnp.reshape(t, t.shape + (1,) * (like.ndim - 1))


def euler_sample(v_fn: VelocityFn, noise: Array, num_steps: int, *, t_start: float = 1.0,
                 t_end: float = 0.0) -> Array:
  """Explicit Euler on dz/dt = v(z, t) from t_start to t_end in `num_steps` uniform steps.

  z_{i+1} = z_i + (t_{i+1} - t_i) v(z_i, t_i). First order: the error at t_end halves when the
  steps double. One velocity evaluation per step.
  v_fn(z, t) -> v with z: (B, ...), t: (B,); noise: (B, ...). Returns z at t_end, shaped like
  noise, in float32 (float64 for float64 noise).
  """

  def step(z, t, t_next):
    h = _per_sample(t_next - t, z)
    return z + h * _eval(v_fn, z, t)

  return _integrate(step, noise, num_steps, t_start, t_end)


def heun_sample(v_fn: VelocityFn, noise: Array, num_steps: int, *, t_start: float = 1.0,
                t_end: float = 0.0) -> Array:
  """Heun's method (explicit trapezoid) on dz/dt = v(z, t), `num_steps` uniform steps.

  Predictor z' = z_i + h v(z_i, t_i), corrector z_{i+1} = z_i + h/2 (v(z_i, t_i) + v(z', t_{i+1})),
  h = t_{i+1} - t_i. Second order: the error at t_end falls 4x when the steps double. Unlike EDM,
  whose ODE is singular at sigma = 0 and so ends with an Euler step, the velocity of the linear
  path is defined at t = 0, so the last step is corrected too: 2 evaluations on every step.
  Shapes and dtypes as in `euler_sample`.
  """

  def step(z, t, t_next):
    h = _per_sample(t_next - t, z)
    d_1 = _eval(v_fn, z, t)
    d_2 = _eval(v_fn, z + h * d_1, t_next)
    return z + 0.5 * h * (d_1 + d_2)

  return _integrate(step, noise, num_steps, t_start, t_end)


_SOLVERS = {"euler": euler_sample, "heun": heun_sample}


def sample_teacher(v_fn: CondVelocityFn, noise: Array, c: Any, *, num_steps: int,
                   method: str = "euler", cfg_scale: float = 1.0,
                   cfg_interval: Optional[Sequence[float]] = None,
                   null: Any = None, t_start: float = 1.0,
                   t_end: float = 0.0, guided_channels: Optional[int] = None) -> Array:
  """Samples a conditional flow teacher with classifier-free guidance.

  Every velocity evaluation is `paths.cfg_velocity`: v_w = v(z, t | null) + w (v(z, t | c) -
  v(z, t | null)), with w = cfg_scale inside `cfg_interval` = (t_lo, t_hi) and 1 outside it
  (None: everywhere), on the first `guided_channels` channels (None: all; see cfg_velocity).
  With cfg_scale == 1 the unconditional pass is skipped.

  v_fn(z, t, c) -> v; noise: (B, ...); c: the condition (labels (B,) or a text pytree);
  null: the null condition shaped like c, or the null label as an int (num_classes by our
  convention); needed whenever cfg_scale != 1. cfg_scale must be a concrete number (it decides
  whether the unconditional pass runs). Returns x: (B, ...) float32. Network forward passes per
  sample: `teacher_nfe(num_steps, method, cfg_scale)`.
  """
  solver = _SOLVERS[_check_method(method)]
  if cfg_scale != 1.0 and null is None:
    raise ValueError(f"cfg_scale={cfg_scale} needs the null condition of the unconditional "
                     "model (null=).")

  def guided(z, t):
    return cfg_velocity(v_fn, z, t, c, w=cfg_scale, null=null, interval=cfg_interval,
                        guided_channels=guided_channels)

  return solver(guided, noise, num_steps, t_start=t_start, t_end=t_end)


def teacher_nfe(num_steps: int, method: str = "euler", cfg_scale: float = 1.0) -> int:
  """Network forward passes per sample made by `sample_teacher`.

  Euler makes 1 velocity evaluation a step, Heun 2 (its last step included). With guidance
  (cfg_scale != 1) each evaluation is a conditional plus an unconditional pass, which we count as
  2: they cost two forward passes of compute even though they go through the network as one
  batch of 2B. That is the count that FLOP comparisons need (e.g. DiT-XL/2 with 250 steps and CFG
  is 500 here). Papers that quote "NFE" per step of the guided sampler count a CFG pair as 1:
  divide by 2 to get theirs. A guidance interval does not lower the count, because
  `paths.cfg_velocity` runs both passes on the whole batch and only sets w = 1 outside it.
  For comparison, the one-step student (`flow_map_sample`) makes num_steps passes: 1 by default.
  """
  num_steps = _check_num_steps(num_steps)
  passes_per_eval = 1 if cfg_scale == 1.0 else 2
  return EVALS_PER_STEP[_check_method(method)] * num_steps * passes_per_eval


def flow_map_sample(u_fn: MeanVelocityFn, noise: Array, num_steps: int = 1, *,
                    t_start: float = 1.0, t_end: float = 0.0) -> Array:
  """The MeanFlow student's sampler: jumps along the flow map with the mean velocity.

  z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid of `num_steps` intervals; with the default
  one step this is x = e - u(e, 0, 1). With an exact mean velocity every step is exact, so the
  result does not depend on num_steps; with a learned one, more steps trade compute for quality.
  u_fn(z, r, t) -> u with z: (B, ...), r, t: (B,) (a conditional student closes over its labels);
  noise: (B, ...). Returns x: (B, ...) float32. One network pass per step.
  """

  def step(z, t, r):
    return z - _per_sample(t - r, z) * _eval(u_fn, z, r, t)

  return _integrate(step, noise, num_steps, t_start, t_end)
