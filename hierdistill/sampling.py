"""Samplers: the teacher's ODE (Euler, Heun, SANA's Flow-DPM-Solver, with CFG) and the student's
flow map (1 or few steps).

Pure JAX, no Flax: models enter as callables. Time runs from t = 1 (noise) to t = 0 (data) on a
uniform grid t_i = (1 - i / N) t_start + (i / N) t_end, i = 0..N (METHOD.md conventions); with a
flow shift s != 1 the grid is warped to s t / (1 + (s - 1) t), which spends more steps near the
noise (SANA: s = 3). 'dpm++2m' is DPM-Solver++ 2M on the flow on diffusers' shifted grid
(`flow_sigmas`), SANA's default sampler.

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

A network enters only at the end (`apply_model`, `velocity_fn`, `sample_teacher_from_config`):
any module whose apply takes (z, r, t, c), the interface of every network here; still no Flax
import. They live with the samplers, not the training stages, so that a finished generator and
the evaluation sample a network without importing training code.
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
EVALS_PER_STEP = {"euler": 1, "heun": 2, "dpm++2m": 1}
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


def flow_shift(t, shift: float):
  """SANA's (SD3's) time shift t' = s t / (1 + (s - 1) t): keeps 0 and 1, moves the rest towards
  the noise for s > 1 (numpy or jnp, elementwise)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def _integrate(step: Callable[[Array, Array, Array], Array], noise: Array, num_steps: int,
               t_start, t_end, shift: float = 1.0,
               times: Optional[Sequence[float]] = None) -> Array:
  """Runs z <- step(z, t_i, t_{i+1}) for i = 0..N-1 from z = noise, with t_i, t_{i+1}: (B,);
  the uniform grid, warped by flow_shift when shift != 1, or the grid `times` (N + 1 values)."""
  num_steps = _check_num_steps(num_steps)
  z0 = _state(noise)
  b, dtype = z0.shape[0], z0.dtype
  time = _grid_time
  if times is not None:
    grid = jnp.asarray(times, dtype)
    time = lambda i, *_: grid[i]
  elif shift != 1.0:  # shift == 1 keeps the plain grid's program unchanged
    time = lambda *a: flow_shift(_grid_time(*a), jnp.asarray(shift, dtype))

  def body(i, z):
    t = jnp.full((b,), time(i, num_steps, t_start, t_end, dtype))
    t_next = jnp.full((b,), time(i + 1, num_steps, t_start, t_end, dtype))
    return step(z, t, t_next)

  return jax.lax.fori_loop(0, num_steps, body, z0)


def _per_sample(t: Array, like: Array) -> Array:
  """(B,) -> (B, 1, ..., 1), to scale a state of shape (B, ...)."""
  return jnp.reshape(t, t.shape + (1,) * (like.ndim - 1))


def euler_sample(v_fn: VelocityFn, noise: Array, num_steps: int, *, t_start: float = 1.0,
                 t_end: float = 0.0, shift: float = 1.0) -> Array:
  """Explicit Euler on dz/dt = v(z, t) from t_start to t_end in `num_steps` uniform steps.

  z_{i+1} = z_i + (t_{i+1} - t_i) v(z_i, t_i). First order: the error at t_end halves when the
  steps double. One velocity evaluation per step.
  v_fn(z, t) -> v with z: (B, ...), t: (B,); noise: (B, ...). Returns z at t_end, shaped like
  noise, in float32 (float64 for float64 noise). shift != 1: the grid t_i is flow_shift(t_i).
  """

  def step(z, t, t_next):
    h = _per_sample(t_next - t, z)
    return z + h * _eval(v_fn, z, t)

  return _integrate(step, noise, num_steps, t_start, t_end, shift)


def heun_sample(v_fn: VelocityFn, noise: Array, num_steps: int, *, t_start: float = 1.0,
                t_end: float = 0.0, shift: float = 1.0) -> Array:
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

  return _integrate(step, noise, num_steps, t_start, t_end, shift)


# -- SANA's Flow-DPM-Solver ----------------------------------------------------------------------

def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000
                ) -> np.ndarray:
  """The noise levels sigma_0 > ... > sigma_N = 0 of diffusers' DPMSolverMultistepScheduler
  with use_flow_sigmas (SANA's pipeline), float32 (N + 1,).

  sigma_i = flow_shift(1 - a_i) for a = linspace(1, 1 / T, N + 1) reversed, the last (0) dropped
  and a final 0 appended: so sigma_0 = flow_shift(1 - 1 / T) (0.99967 at s = 3, T = 1000), not 1;
  the pipeline starts from pure noise there all the same.
  """
  num_steps = _check_num_steps(num_steps)
  alphas = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)
  sigmas = np.flip(flow_shift(1.0 - alphas, float(shift)))[:-1]
  return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def flow_timesteps(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000
                   ) -> np.ndarray:
  """The integer timesteps diffusers' scheduler hands the network with flow_sigmas: floor(T
  sigma_i) for i < N, computed in float64 before the float32 cast as diffusers does. (N,) int64.
  NVlabs' SanaMS also casts its timesteps to integers, so the published numbers were made with
  the network reading these."""
  alphas = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)
  sigmas = np.flip(flow_shift(1.0 - alphas, float(shift)))[:-1]
  return (sigmas * num_train_timesteps).astype(np.int64)


def dpm_solver_coefficients(sigmas: np.ndarray) -> tuple:
  """(a, b, c), each (N,) float64, of DPM-Solver++ 2M (midpoint) on the flow path:
  z_{i+1} = a_i z_i + b_i x0_i + c_i x0_{i-1}, with x0_i = z_i - sigma_i v_i the data prediction.

  With alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_{i+1} - lambda_i,
  r = (lambda_i - lambda_{i-1}) / h (Lu et al. 2022, DPM-Solver++):
    first order  z' = (sigma' / sigma) z - alpha' (e^-h - 1) x0_i
    second order z' = (sigma' / sigma) z - alpha' (e^-h - 1) (D0 + D1 / 2),
                 D0 = x0_i, D1 = (x0_i - x0_{i-1}) / r.
  Steps are second order except the first (no history) and the last (diffusers'
  lower_order_final with final sigma 0), as diffusers' scheduler with solver_order=2.
  e^-h = (sigma' alpha) / (alpha' sigma) is taken without logs, so the last step (sigma' = 0)
  is exactly z' = x0.
  """
  s = np.asarray(sigmas, np.float64)
  n = len(s) - 1
  alpha = 1.0 - s
  a = s[1:] / s[:-1]
  exp_neg_h = (s[1:] * alpha[:-1]) / (alpha[1:] * s[:-1])
  b = -alpha[1:] * (exp_neg_h - 1.0)
  c = np.zeros(n)
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(s)
  for i in range(1, n - 1):
    r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
    c[i] = -0.5 * b[i] / r
    b[i] = b[i] * (1.0 + 0.5 / r)
  return a, b, c


def dpm_solver_sample(v_fn: VelocityFn, noise: Array, sigmas, *,
                      model_times=None) -> Array:
  """SANA's Flow-DPM-Solver: DPM-Solver++ 2M on dz/dsigma = v through the noise levels `sigmas`
  (N + 1,) (flow_sigmas: diffusers' grid), from z = noise at sigma_0 to sigma_N = 0.

  One velocity evaluation a step; the model reads t = model_times[i] (default sigma_i; SANA's
  pipeline: flow_timesteps / 1000). Coefficients from dpm_solver_coefficients (numpy, static).
  v_fn(z, t) -> v; noise (B, ...). Returns x (B, ...) float32.
  """
  sigmas = np.asarray(sigmas, np.float32)
  if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0.0 or np.any(np.diff(sigmas) >= 0):
    raise ValueError(f"sigmas must decrease strictly to a final 0; got {sigmas}.")
  n = len(sigmas) - 1
  times = sigmas[:-1] if model_times is None else np.asarray(model_times, np.float64)
  if times.shape != (n,):
    raise ValueError(f"model_times must have one time per step ({n}); got {times.shape}.")
  z0 = _state(noise)
  b, dtype = z0.shape[0], z0.dtype
  coef_a, coef_b, coef_c = (jnp.asarray(x, dtype) for x in dpm_solver_coefficients(sigmas))
  sig, times = jnp.asarray(sigmas, dtype), jnp.asarray(times, dtype)

  def body(i, carry):
    z, x0_prev = carry
    x0 = z - sig[i] * _eval(v_fn, z, jnp.full((b,), times[i]))
    return coef_a[i] * z + coef_b[i] * x0 + coef_c[i] * x0_prev, x0

  return jax.lax.fori_loop(0, n, body, (z0, jnp.zeros_like(z0)))[0]


_SOLVERS = {"euler": euler_sample, "heun": heun_sample}


def sample_teacher(v_fn: CondVelocityFn, noise: Array, c: Any, *, num_steps: int,
                   method: str = "euler", cfg_scale: float = 1.0,
                   cfg_interval: Optional[Sequence[float]] = None,
                   null: Any = None, t_start: float = 1.0,
                   t_end: float = 0.0, guided_channels: Optional[int] = None,
                   shift: float = 1.0, integer_timesteps: bool = False) -> Array:
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

  method 'euler' / 'heun': the uniform grid from t_start to t_end, warped by flow_shift(., shift)
  when shift != 1. 'dpm++2m': SANA's Flow-DPM-Solver on flow_sigmas(num_steps, shift) (t_start
  and t_end must stay 1 and 0: diffusers' grid fixes them); integer_timesteps=True makes the
  network read flow_timesteps / 1000 as SANA's pipelines do (the ODE still uses the exact sigmas).
  """
  _check_method(method)
  if cfg_scale != 1.0 and null is None:
    raise ValueError(f"cfg_scale={cfg_scale} needs the null condition of the unconditional "
                     "model (null=).")

  def guided(z, t):
    return cfg_velocity(v_fn, z, t, c, w=cfg_scale, null=null, interval=cfg_interval,
                        guided_channels=guided_channels)

  if method == "dpm++2m":
    if (t_start, t_end) != (1.0, 0.0):
      raise ValueError("method='dpm++2m' runs on diffusers' flow grid from 1 to 0; t_start and "
                       f"t_end cannot be moved (got {t_start}, {t_end}).")
    sigmas = flow_sigmas(num_steps, shift)
    times = flow_timesteps(num_steps, shift) / 1000.0 if integer_timesteps else None
    return dpm_solver_sample(guided, noise, sigmas, model_times=times)
  if integer_timesteps:
    raise ValueError("integer_timesteps is SANA's Flow-DPM-Solver's (method='dpm++2m').")
  kw = {"shift": shift} if shift != 1.0 else {}
  return _SOLVERS[method](guided, noise, num_steps, t_start=t_start, t_end=t_end, **kw)


def teacher_nfe(num_steps: int, method: str = "euler", cfg_scale: float = 1.0) -> int:
  """Network forward passes per sample made by `sample_teacher`.

  Euler and DPM-Solver++ 2M make 1 velocity evaluation a step, Heun 2 (its last step
  included). With guidance (cfg_scale != 1) each evaluation is a conditional plus an
  unconditional pass, which we count as 2: they cost two forward passes of compute even though
  they go through the network as one batch of 2B. That is the count that FLOP comparisons need
  (e.g. DiT-XL/2 with 250 steps and CFG is 500 here). Papers that quote "NFE" per step of the
  guided sampler count a CFG pair as 1: divide by 2 to get theirs. A guidance interval does not
  lower the count, because `paths.cfg_velocity` runs both passes on the whole batch and only
  sets w = 1 outside it. For comparison, the one-step student (`flow_map_sample`) makes
  num_steps passes: 1 by default.
  """
  num_steps = _check_num_steps(num_steps)
  passes_per_eval = 1 if cfg_scale == 1.0 else 2
  return EVALS_PER_STEP[_check_method(method)] * num_steps * passes_per_eval


def flow_map_sample(u_fn: MeanVelocityFn, noise: Array, num_steps: int = 1, *,
                    t_start: float = 1.0, t_end: float = 0.0,
                    times: Optional[Sequence[float]] = None) -> Array:
  """The MeanFlow student's sampler: jumps along the flow map with the mean velocity.

  z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid of `num_steps` intervals; with the default
  one step this is x = e - u(e, 0, 1). With an exact mean velocity every step is exact, so the
  result does not depend on num_steps; with a learned one, more steps trade compute for quality.
  times: the grid itself instead (t_start, ..., t_end, decreasing; check_times), e.g.
  (1, 0.75, 0): two jumps through t = 0.75, for a student whose short intervals near the data
  are better kept than those near the noise (benchmarks/README.md, two_step.py); num_steps is
  then len(times) - 1 (leave it at its default, or give that).
  u_fn(z, r, t) -> u with z: (B, ...), r, t: (B,) (a conditional student closes over its labels);
  noise: (B, ...). Returns x: (B, ...) float32. One network pass per step.
  """

  def step(z, t, r):
    return z - _per_sample(t - r, z) * _eval(u_fn, z, r, t)

  if times is not None:
    times = check_times(times, None if num_steps == 1 else num_steps)  # 1: the default
    num_steps = len(times) - 1
  return _integrate(step, noise, num_steps, t_start, t_end, times=times)


def check_times(times: Sequence[float], num_steps: Optional[int] = None) -> tuple[float, ...]:
  """A flow-map sampler's time grid as floats: from 1 (the noise) down to 0 (the data), strictly
  decreasing, e.g. (1, 0.75, 0), and of num_steps + 1 values when num_steps is given;
  ValueError naming what is wrong otherwise."""
  try:
    grid = tuple(float(t) for t in times)
  except (TypeError, ValueError):
    raise ValueError(f"times={times!r}: give numbers from 1 down to 0, e.g. 1,0.75,0.") from None
  if len(grid) < 2 or grid[0] != 1.0 or grid[-1] != 0.0:
    raise ValueError(f"times={grid}: a grid starts at 1 (the noise) and ends at 0 (the data), "
                     "e.g. 1,0.75,0.")
  if any(a <= b for a, b in zip(grid[:-1], grid[1:])):
    raise ValueError(f"times={grid}: the times must decrease strictly, e.g. 1,0.75,0.")
  if num_steps is not None and num_steps != len(grid) - 1:
    raise ValueError(f"num_steps={num_steps} and times={grid} ({len(grid) - 1} steps) disagree; "
                     "give one of them.")
  return grid


# -- a network and its params as the callables above ---------------------------------------------

def apply_model(model, params, z, r, t, c, **kwargs) -> Array:
  """model.apply with the (z, r, t, c) interface of every network here."""
  return model.apply({"params": params}, z, r, t, c, **kwargs)


def velocity_fn(model, params) -> CondVelocityFn:
  """v(z, t, c) of a flow model (teacher or fake network): r = t."""
  return lambda z, t, c: apply_model(model, params, z, None, t, c)


def sample_teacher_from_config(config, model, conditions, params, noise, c, *,
                               num_steps: int) -> Array:
  """The teacher's ODE with config.sample's solver and guidance against the null condition."""
  s = config.sample
  return sample_teacher(
      velocity_fn(model, params), noise, c, num_steps=num_steps, method=s.teacher_method,
      cfg_scale=s.cfg_scale, cfg_interval=s.get("cfg_interval"),
      guided_channels=s.get("guided_channels"), null=conditions.null_like(c),
      shift=float(s.get("shift", 1.0)), integer_timesteps=bool(s.get("integer_timesteps", False)))
