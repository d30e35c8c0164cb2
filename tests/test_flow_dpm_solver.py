"""SANA's teacher samplers (sampling.py): Flow-DPM-Solver against diffusers'
DPMSolverMultistepScheduler step by step on a toy velocity, the shifted Euler grid, and CFG
with the empty prompt's condition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill import sampling

M, S = 0.7, 2.0  # toy data N(M, S^2): its exact velocity field is known in closed form
B, D = 16, 3


def toy_velocity(z, t):
  """v = e - x of N(M, S^2) data at time t (B,): the exact velocity, numpy or jnp."""
  xp = jnp if isinstance(z, jax.Array) else np
  t = xp.reshape(t, (-1,) + (1,) * (z.ndim - 1))
  var = (1.0 - t) ** 2 * S ** 2 + t ** 2
  return -M + (t - (1.0 - t) * S ** 2) / var * (z - (1.0 - t) * M)


def _scheduler(shift):
  diffusers = pytest.importorskip("diffusers")
  # SANA's pipeline scheduler (scheduler/scheduler_config.json of the diffusers folders).
  return diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
      solver_type="midpoint", prediction_type="flow_prediction", use_flow_sigmas=True,
      flow_shift=shift, final_sigmas_type="zero", lower_order_final=True)


def _diffusers_run(noise, num_steps, shift, integer_timesteps):
  """(states the network saw, times it read, final sample) of diffusers' loop."""
  torch = pytest.importorskip("torch")
  sched = _scheduler(shift)
  sched.set_timesteps(num_steps)
  z = torch.from_numpy(np.asarray(noise, np.float32))
  seen, times = [], []
  for i, timestep in enumerate(sched.timesteps):
    t = float(timestep) / 1000.0 if integer_timesteps else float(sched.sigmas[i])
    seen.append(z.numpy().copy())
    times.append(t)
    v = torch.from_numpy(toy_velocity(z.numpy().astype(np.float64),
                                      np.full((len(z),), t)).astype(np.float32))
    z = sched.step(v, timestep, z, return_dict=False)[0]
  return np.stack(seen), np.asarray(times), z.numpy(), sched


@pytest.fixture(scope="module")
def noise():
  return np.asarray(jax.random.normal(jax.random.PRNGKey(0), (B, D)), np.float32)


def test_flow_sigmas_and_timesteps_are_diffusers(noise):
  for n in (1, 2, 20, 50):
    for shift in (1.0, 3.0):
      sched = _scheduler(shift)
      sched.set_timesteps(n)
      np.testing.assert_array_equal(sampling.flow_sigmas(n, shift), sched.sigmas.numpy())
      np.testing.assert_array_equal(sampling.flow_timesteps(n, shift), sched.timesteps.numpy())
  s = sampling.flow_sigmas(20, 3.0)
  assert s[-1] == 0.0 and abs(s[0] - 3 * 0.999 / (1 + 2 * 0.999)) < 1e-6


@pytest.mark.parametrize("num_steps", [1, 2, 3, 20, 50])
@pytest.mark.parametrize("integer_timesteps", [False, True])
def test_dpm_solver_matches_diffusers_step_by_step(noise, num_steps, integer_timesteps):
  seen_ref, times_ref, x_ref, _ = _diffusers_run(noise, num_steps, 3.0, integer_timesteps)
  seen, times = [], []

  def v_fn(z, t):  # un-jitted: records the state and time of every step
    seen.append(np.asarray(z))
    times.append(float(t[0]))
    return toy_velocity(z, t)

  with jax.disable_jit():
    x = sampling.sample_teacher(lambda z, t, c: v_fn(z, t), jnp.asarray(noise), None,
                                num_steps=num_steps, method="dpm++2m", shift=3.0,
                                integer_timesteps=integer_timesteps)
  assert len(seen) == num_steps == sampling.teacher_nfe(num_steps, "dpm++2m")
  np.testing.assert_allclose(times, times_ref, rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.stack(seen), seen_ref, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(x, x_ref, rtol=1e-5, atol=2e-5)


def test_dpm_solver_beats_euler_and_jits(noise):
  """On the exact field, Flow-DPM-Solver lands far nearer the exact map x = M + S e than Euler on
  the same shifted grid at equal steps (its error is not monotone in N: diffusers' grid starts at
  sigma_0 < 1 and its last step jumps to the data prediction); jit gives the eager result."""
  exact = M + S * noise
  run = lambda n: jax.jit(lambda e: sampling.sample_teacher(
      lambda z, t, c: toy_velocity(z, t), e, None, num_steps=n, method="dpm++2m",
      shift=3.0))(jnp.asarray(noise))
  for n in (10, 20, 50):
    err_dpm = float(jnp.max(jnp.abs(run(n) - exact)))
    err_euler = float(jnp.max(jnp.abs(sampling.euler_sample(toy_velocity, noise, n, shift=3.0)
                                      - exact)))
    assert err_dpm < 0.05 and err_dpm < err_euler / 5, (n, err_dpm, err_euler)
  eager = sampling.dpm_solver_sample(toy_velocity, jnp.asarray(noise),
                                     sampling.flow_sigmas(20, 3.0))
  np.testing.assert_allclose(run(20), eager, atol=1e-6)


def test_shifted_euler_grid(noise):
  """shift=s puts Euler's steps at flow_shift of the uniform grid; shift=1 is the plain Euler."""
  seen = []

  def v_fn(z, t, c):
    seen.append(float(t[0]))
    return toy_velocity(z, t)

  with jax.disable_jit():
    sampling.sample_teacher(v_fn, jnp.asarray(noise), None, num_steps=4, shift=3.0)
  grid = 1.0 - np.arange(4) / 4
  np.testing.assert_allclose(seen, 3 * grid / (1 + 2 * grid), rtol=1e-6)
  plain = sampling.sample_teacher(lambda z, t, c: toy_velocity(z, t), jnp.asarray(noise), None,
                                  num_steps=4)
  np.testing.assert_array_equal(plain, sampling.euler_sample(toy_velocity, noise, 4))
  shifted = sampling.euler_sample(toy_velocity, noise, 50, shift=3.0)
  assert float(jnp.max(jnp.abs(shifted - (M + S * noise)))) < 0.15
  assert float(jnp.max(jnp.abs(shifted - plain))) > 1e-3


def test_cfg_with_the_empty_prompt_condition(noise):
  """CFG 4.5 against a text null (dict condition): the solver integrates
  v_null + 4.5 (v_c - v_null), the field that diffusers' pipeline hands its scheduler."""
  c = {"embeddings": jnp.ones((B, 3, 2)), "mask": jnp.ones((B, 3), jnp.int32)}
  null = {"embeddings": jnp.zeros((B, 3, 2)), "mask": jnp.ones((B, 3), jnp.int32)}

  def v_fn(z, t, cond):  # the caption moves the data mean by +1
    return toy_velocity(z, t) - cond["embeddings"][:, 0, :1]

  x = sampling.sample_teacher(v_fn, jnp.asarray(noise), c, num_steps=20, method="dpm++2m",
                              shift=3.0, cfg_scale=4.5, null=null)
  guided = lambda z, t: toy_velocity(z, t) - 4.5
  ref = sampling.dpm_solver_sample(guided, jnp.asarray(noise), sampling.flow_sigmas(20, 3.0))
  np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
  assert sampling.teacher_nfe(20, "dpm++2m", 4.5) == 40


def test_errors(noise):
  v = lambda z, t, c: toy_velocity(z, t)
  with pytest.raises(ValueError, match="t_start"):
    sampling.sample_teacher(v, noise, None, num_steps=4, method="dpm++2m", t_start=0.5)
  with pytest.raises(ValueError, match="integer_timesteps"):
    sampling.sample_teacher(v, noise, None, num_steps=4, integer_timesteps=True)
  with pytest.raises(ValueError, match="decrease"):
    sampling.dpm_solver_sample(toy_velocity, noise, np.array([1.0, 0.5, 0.1]))
  with pytest.raises(ValueError, match="dpm\\+\\+2m"):
    sampling.teacher_nfe(4, "unipc")
