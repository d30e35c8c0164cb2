"""Tests of hierdistill.sampling against the exact flow of Gaussian data.

For x ~ N(m, s^2 I) and e ~ N(0, I) on the linear path z_t = (1 - t) x + t e, z_t and e - x are
jointly Gaussian (per coordinate), so the velocity field v(z, t) = E[e - x | z_t = z] is linear:
  E[z_t] = (1 - t) m,  Var z_t = sigma_t^2 = (1 - t)^2 s^2 + t^2,
  E[e - x] = -m,       Cov(e - x, z_t) = t - (1 - t) s^2,
  v(z, t) = -m + (t - (1 - t) s^2) / sigma_t^2 (z - (1 - t) m).
Its flow from z_1 = e is z_t = (1 - t) m + sigma_t e (d sigma_t / dt = (t - (1 - t) s^2) / sigma_t
makes it solve dz/dt = v), so it maps e to x = m + s e, and the mean velocity over [r, t] is
  u(z, r, t) = (z - z_r) / (t - r),  z_r = (1 - r) m + sigma_r (z - (1 - t) m) / sigma_t.
"""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill import sampling

M, S = 0.7, 2.0  # data mean and standard deviation (see test_convergence_order for why 2)
B, D = 64, 3


def _sigma(t, s=S):
  return jnp.sqrt((1.0 - t) ** 2 * s ** 2 + t ** 2)


def _col(t, z):
  return jnp.reshape(t, t.shape + (1,) * (z.ndim - 1))


def gaussian_velocity(z, t, m=M, s=S):
  """The exact velocity field of N(m, s^2) data; t: (B,)."""
  t = _col(t, z)
  return -m + (t - (1.0 - t) * s ** 2) / _sigma(t, s) ** 2 * (z - (1.0 - t) * m)


def gaussian_mean_velocity(z, r, t, m=M, s=S):
  """The exact mean velocity over [r, t] (r < t) of N(m, s^2) data."""
  r, t = _col(r, z), _col(t, z)
  e = (z - (1.0 - t) * m) / _sigma(t, s)
  z_r = (1.0 - r) * m + _sigma(r, s) * e
  return (z - z_r) / (t - r)


def exact_map(e, m=M, s=S):
  return m + s * e


@pytest.fixture(scope="module")
def noise():
  return jax.random.normal(jax.random.PRNGKey(0), (B, D), jnp.float32)


def test_closed_form_is_consistent(noise):
  # The test's own derivation: the flow solves the ODE (checked by a derivative in t) and u at
  # r -> t tends to v. If this failed, the order tests below would measure nothing.
  t = jnp.full((B,), 0.37)
  flow = lambda t_: (1.0 - _col(t_, noise)) * M + _sigma(_col(t_, noise)) * noise
  _, dz_dt = jax.jvp(flow, (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(dz_dt, gaussian_velocity(flow(t), t), rtol=1e-5, atol=1e-5)
  u = gaussian_mean_velocity(flow(t), t - 1e-3, t)
  np.testing.assert_allclose(u, gaussian_velocity(flow(t), t), rtol=1e-2, atol=1e-2)


def _errors(solver, noise, steps):
  return np.array([
      float(jnp.max(jnp.abs(solver(gaussian_velocity, noise, n) - exact_map(noise))))
      for n in steps])


def _orders(errors):
  return np.log2(errors[:-1] / errors[1:])


@pytest.mark.parametrize("solver, lo, hi", [
    (sampling.euler_sample, 0.8, 1.3),
    (sampling.heun_sample, 1.7, 2.4),
])
def test_convergence_order(noise, solver, lo, hi):
  # The mean m is transported exactly by both solvers (along e = 0 the flow is linear in t), so
  # the error is c_N e with c_N -> 0 at the solver's order. The data scale S decides how soon the
  # asymptotic order shows: at S = 0.5 Heun's 4 -> 8 step ratio is still ~1 (pre-asymptotic), at
  # S = 1 the leading term cancels by symmetry (order 3); at S = 2 Euler gives 0.90..0.97 and
  # Heun 2.24..2.10 over 4..32 steps.
  steps = (4, 8, 16, 32)
  errors = _errors(solver, noise, steps)
  assert np.all(errors > 0) and np.all(np.diff(errors) < 0), errors
  orders = _orders(errors)
  assert np.all((orders >= lo) & (orders <= hi)), (errors, orders)


def test_heun_beats_euler_at_equal_cost(noise):
  # Heun with N steps costs as much as Euler with 2N: it must still be far more accurate.
  err_heun = _errors(sampling.heun_sample, noise, (16,))[0]
  err_euler = _errors(sampling.euler_sample, noise, (32,))[0]
  assert err_heun < 0.2 * err_euler, (err_heun, err_euler)


def test_one_step_euler_is_one_evaluation(noise):
  # One Euler step from t = 1 to 0 is x = e - v(e, 1): checks the grid and the sign of the step.
  x = sampling.euler_sample(gaussian_velocity, noise, 1)
  np.testing.assert_allclose(x, noise - gaussian_velocity(noise, jnp.ones((B,))), rtol=1e-6)


def test_time_grid_and_interval(noise):
  # Record the times each solver asks for (un-jitted: the Python list sees every call).
  for solver, expected in [
      (sampling.euler_sample, [1.0, 0.75, 0.5, 0.25]),
      (sampling.heun_sample, [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0]),
  ]:
    seen = []

    def v_fn(z, t):
      assert t.shape == (B,)
      seen.append(float(t[0]))
      return jnp.zeros_like(z)

    with jax.disable_jit():
      solver(v_fn, noise, 4)
    np.testing.assert_allclose(seen, expected, atol=1e-7)
  # A sub-interval [0.2, 0.6] of the exact flow: starting from z_0.6 it lands on z_0.2.
  z_at = lambda t: (1.0 - t) * M + _sigma(t) * noise
  z = sampling.heun_sample(gaussian_velocity, z_at(0.6), 64, t_start=0.6, t_end=0.2)
  np.testing.assert_allclose(z, z_at(0.2), atol=1e-4)


def test_flow_map_one_step_is_exact(noise):
  x = sampling.flow_map_sample(gaussian_mean_velocity, noise)
  np.testing.assert_allclose(x, exact_map(noise), rtol=1e-5, atol=1e-5)
  # The default is one evaluation at (r, t) = (0, 1): x = e - u(e, 0, 1).
  u_01 = lambda z, r, t: z - exact_map(z)
  np.testing.assert_allclose(sampling.flow_map_sample(u_01, noise), exact_map(noise), atol=1e-6)


@pytest.mark.parametrize("num_steps", [2, 3, 7])
def test_flow_map_k_steps_with_exact_u_is_exact(noise, num_steps):
  x = sampling.flow_map_sample(gaussian_mean_velocity, noise, num_steps)
  np.testing.assert_allclose(x, exact_map(noise), rtol=1e-5, atol=1e-5)


def test_flow_map_steps_ask_for_adjacent_intervals(noise):
  seen = []

  def u_fn(z, r, t):
    assert r.shape == t.shape == (B,)
    seen.append((float(r[0]), float(t[0])))
    return jnp.zeros_like(z)

  with jax.disable_jit():
    sampling.flow_map_sample(u_fn, noise, 4)
  np.testing.assert_allclose(seen, [(0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)])


def test_flow_map_on_a_time_grid_jumps_where_it_says(noise):
  """times=(1, 0.75, 0.2, 0): the intervals asked are exactly the grid's, the exact u is still
  exact on it, and a grid that does not run from 1 down to 0 is refused by name."""
  seen = []

  def u_fn(z, r, t):
    seen.append((float(r[0]), float(t[0])))
    return jnp.zeros_like(z)

  with jax.disable_jit():
    sampling.flow_map_sample(u_fn, noise, times=(1, 0.75, 0.2, 0))
  np.testing.assert_allclose(seen, [(0.75, 1.0), (0.2, 0.75), (0.0, 0.2)])
  x = sampling.flow_map_sample(gaussian_mean_velocity, noise, times=[1.0, 0.9, 0.0])
  np.testing.assert_allclose(x, exact_map(noise), rtol=1e-5, atol=1e-5)
  # The uniform grid named as times is the num_steps sampler.
  wrong_u = lambda z, r, t: gaussian_velocity(z, t)
  np.testing.assert_allclose(sampling.flow_map_sample(wrong_u, noise, times=(1, 0.5, 0)),
                             sampling.flow_map_sample(wrong_u, noise, 2), atol=1e-6)
  for bad, words in [((1, 0.5), "ends at 0"), ((0.9, 0), "starts at 1"), ((1,), "starts at 1"),
                     ((1, 0.3, 0.5, 0), "decrease strictly"), (("1", "x", "0"), "give numbers")]:
    with pytest.raises(ValueError, match=words):
      sampling.flow_map_sample(u_fn, noise, times=bad)
  with pytest.raises(ValueError, match="disagree"):
    sampling.flow_map_sample(u_fn, noise, 3, times=(1, 0.5, 0))


def test_flow_map_with_a_wrong_u_depends_on_steps(noise):
  # The instantaneous velocity used as if it were the mean velocity is only exact in the limit,
  # so the result moves with num_steps (guards against a sampler that ignores num_steps).
  u_fn = lambda z, r, t: gaussian_velocity(z, t)
  x_1 = sampling.flow_map_sample(u_fn, noise, 1)
  x_8 = sampling.flow_map_sample(u_fn, noise, 8)
  assert float(jnp.max(jnp.abs(x_1 - x_8))) > 1e-2
  np.testing.assert_allclose(x_8, sampling.euler_sample(gaussian_velocity, noise, 8), atol=1e-6)


# ----- the class-conditional teacher -----

NUM_CLASSES = 3
CLASS_MEANS = jnp.array([-1.0, 0.5, 2.0, 0.0])  # the last entry: the null label's "mean"


def cond_velocity(z, t, y):
  """A class-conditional Gaussian teacher: class y has data N(CLASS_MEANS[y], S^2)."""
  return gaussian_velocity(z, t, m=_col(CLASS_MEANS[y], z))


@pytest.fixture(scope="module")
def labels():
  return jax.random.randint(jax.random.PRNGKey(1), (B,), 0, NUM_CLASSES)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sample_teacher_unguided_equals_plain_sampler(noise, labels, method):
  x = sampling.sample_teacher(cond_velocity, noise, labels, num_steps=8, method=method,
                              null=NUM_CLASSES)
  solver = {"euler": sampling.euler_sample, "heun": sampling.heun_sample}[method]
  x_ref = solver(lambda z, t: cond_velocity(z, t, labels), noise, 8)
  np.testing.assert_allclose(x, x_ref, rtol=1e-6, atol=1e-6)
  # And it samples the right class: close to the exact map of each class.
  x_exact = exact_map(noise, m=_col(CLASS_MEANS[labels], noise))
  np.testing.assert_allclose(sampling.sample_teacher(
      cond_velocity, noise, labels, num_steps=64, method="heun"), x_exact, atol=1e-3)


@pytest.mark.parametrize("interval", [None, (0.3, 0.8)])
def test_sample_teacher_guided_equals_hand_built_field(noise, labels, interval):
  w = 2.5

  def guided(z, t):
    scale = jnp.full_like(t, w)
    if interval is not None:
      scale = jnp.where((t >= interval[0]) & (t <= interval[1]), scale, 1.0)
    v_c = cond_velocity(z, t, labels)
    v_u = cond_velocity(z, t, jnp.full_like(labels, NUM_CLASSES))
    return v_u + _col(scale, z) * (v_c - v_u)

  x = sampling.sample_teacher(cond_velocity, noise, labels, num_steps=10, method="heun",
                              cfg_scale=w, cfg_interval=interval, null=NUM_CLASSES)
  np.testing.assert_allclose(x, sampling.heun_sample(guided, noise, 10), rtol=1e-5, atol=1e-5)
  unguided = sampling.sample_teacher(cond_velocity, noise, labels, num_steps=10, method="heun")
  assert float(jnp.max(jnp.abs(x - unguided))) > 1e-2  # guidance did something


@pytest.mark.parametrize("method, cfg_scale", [("euler", 1.0), ("euler", 1.5), ("heun", 1.0),
                                               ("heun", 4.0)])
def test_teacher_nfe_counts_forward_passes(noise, labels, method, cfg_scale):
  # Count the rows each un-jitted call pushes through the network: NFE = rows / B.
  rows = []

  def v_fn(z, t, y):
    rows.append(z.shape[0])
    return cond_velocity(z, t, y)

  with jax.disable_jit():
    sampling.sample_teacher(v_fn, noise, labels, num_steps=5, method=method,
                            cfg_scale=cfg_scale, cfg_interval=(0.0, 0.5), null=NUM_CLASSES)
  assert sum(rows) // B == sampling.teacher_nfe(5, method, cfg_scale)


def test_teacher_nfe_values():
  assert sampling.teacher_nfe(250, "euler", 1.0) == 250
  assert sampling.teacher_nfe(250, "euler", 1.5) == 500
  assert sampling.teacher_nfe(50, "heun", 1.0) == 100
  assert sampling.teacher_nfe(50, "heun", 4.0) == 200
  assert sampling.teacher_nfe(1) == 1


def test_errors(noise, labels):
  with pytest.raises(ValueError, match="euler.*heun"):
    sampling.sample_teacher(cond_velocity, noise, labels, num_steps=4, method="rk4")
  with pytest.raises(ValueError, match="euler.*heun"):
    sampling.teacher_nfe(4, "dpm")
  for bad in (0, -3):
    for call in (lambda n: sampling.euler_sample(gaussian_velocity, noise, n),
                 lambda n: sampling.heun_sample(gaussian_velocity, noise, n),
                 lambda n: sampling.flow_map_sample(gaussian_mean_velocity, noise, n),
                 lambda n: sampling.teacher_nfe(n),
                 lambda n: sampling.sample_teacher(cond_velocity, noise, labels, num_steps=n)):
      with pytest.raises(ValueError, match="num_steps"):
        call(bad)
  with pytest.raises(ValueError, match="num_steps"):
    sampling.euler_sample(gaussian_velocity, noise, 2.5)
  with pytest.raises(ValueError, match="null condition"):
    sampling.sample_teacher(cond_velocity, noise, labels, num_steps=4, cfg_scale=2.0)


def test_jit_and_dtypes(noise, labels):
  euler = jax.jit(sampling.euler_sample, static_argnums=(0, 2))
  np.testing.assert_allclose(euler(gaussian_velocity, noise, 8),
                             sampling.euler_sample(gaussian_velocity, noise, 8), atol=1e-6)
  teacher = jax.jit(lambda e, y: sampling.sample_teacher(
      cond_velocity, e, y, num_steps=6, method="heun", cfg_scale=2.0, null=NUM_CLASSES))
  np.testing.assert_allclose(
      teacher(noise, labels),
      sampling.sample_teacher(cond_velocity, noise, labels, num_steps=6, method="heun",
                              cfg_scale=2.0, null=NUM_CLASSES), atol=1e-5)
  # bfloat16 noise and a bfloat16 model: the state is still integrated in float32.
  bf16_model = lambda z, t: gaussian_velocity(z, t).astype(jnp.bfloat16)
  x = sampling.heun_sample(bf16_model, noise.astype(jnp.bfloat16), 16)
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(x, exact_map(noise), atol=5e-2)
  # Images (B, H, W, C), and gradients through a few-step sampler (a student inside a loss).
  img = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 3))
  x = sampling.flow_map_sample(gaussian_mean_velocity, img, 2)
  np.testing.assert_allclose(x, exact_map(img), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda e: jnp.sum(sampling.flow_map_sample(gaussian_mean_velocity, e, 3)))(img)
  np.testing.assert_allclose(grad, jnp.full_like(img, S), rtol=1e-4)


def test_import_is_pure_jax():
  root = Path(__file__).resolve().parents[1]
  code = ("import sys, hierdistill.sampling; "
          "print(sorted(m for m in ('flax', 'optax', 'tensorflow', 'hierdistill.models') "
          "if m in sys.modules))")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
