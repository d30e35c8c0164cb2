"""Stage 2's two-step rows (distribution.two_step_fraction): a share of the generator's rows is
drawn by a two-step path, the flow map's own or DMD2's re-noised one (two_step_path), so that
DMD and the adversarial term reach the intervals that two-step sampling reads. Each path must
be the one its sampler takes, and the lever must change the step only when it is on.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill import pipeline
from hierdistill import sources
from hierdistill.config_checks import ConfigError, validate_config
from test_levers import one_step, perturb, tiny


def _stage_and_params(config):
  nets = pipeline.Networks(config, sources.source_class(config.data.name).condition_kind(config))
  c1 = jax.tree.map(jnp.asarray, nets.conditions.example(1))
  x1, t1 = jnp.zeros((1, 8, 8, 1)), jnp.ones((1,))
  params = perturb(nets.student.init(jax.random.PRNGKey(0), x1, t1, t1, c1)["params"],
                   jax.random.PRNGKey(1))
  return pipeline.build_stage("distribution", config, nets), params


def test_two_step_rows_follow_the_samplers_path():
  stage, params = _stage_and_params(tiny())
  b = 6
  noise = jax.random.normal(jax.random.PRNGKey(2), (b, 8, 8, 1))
  c = jnp.arange(b) % 10
  one = stage.generate(params, noise, c)
  two = stage.sample(params, noise, c, num_steps=2)
  # m = 0.5 is the uniform two-step sampler; m = 0 is G itself, to the bit.
  np.testing.assert_allclose(stage.generate(params, noise, c, jnp.full((b,), 0.5)), two,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stage.generate(params, noise, c, jnp.zeros((b,))), one)
  assert float(jnp.max(jnp.abs(two - one))) > 1e-3  # the two paths differ here
  mixed = stage.generate(params, noise, c, jnp.array([0.5, 0.0] * 3))
  np.testing.assert_allclose(mixed[0::2], two[0::2], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(mixed[1::2], one[1::2])


def test_renoised_rows_jump_from_the_noised_one_step_sample():
  stage, params = _stage_and_params(tiny())
  b = 6
  noise, renoise = jax.random.normal(jax.random.PRNGKey(2), (2, b, 8, 8, 1))
  c = jnp.arange(b) % 10
  m = jnp.array([0.5, 0.0] * 3)
  one = stage.generate(params, noise, c)
  z = 0.5 * one + 0.5 * renoise
  u = stage.student.apply({"params": params}, z, jnp.zeros((b,)), jnp.full((b,), 0.5), c)
  renoised = lambda p: stage.generate(p, noise, c, m, renoise)
  out = renoised(params)
  np.testing.assert_allclose(out[0::2], (z - 0.5 * u)[0::2], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[1::2], one[1::2])
  # Only the second jump of a re-noised row is trained: its gradient is the jump's alone.
  rows = jnp.array([1.0, 0.0] * 3).reshape(b, 1, 1, 1)
  grad = jax.grad(lambda p: jnp.sum(rows * renoised(p)))(params)
  z_fixed = jax.lax.stop_gradient(z)
  second = lambda p: z_fixed - 0.5 * stage.student.apply(
      {"params": p}, z_fixed, jnp.zeros((b,)), jnp.full((b,), 0.5), c)
  expected = jax.grad(lambda p: jnp.sum(rows * second(p)))(params)
  for a, e in zip(jax.tree.leaves(grad), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_two_step_rows_are_drawn_at_the_configured_share():
  config = tiny()
  config.distribution.update(two_step_fraction=0.25, two_step_mid=0.4)
  stage, _ = _stage_and_params(config)
  x = jnp.zeros((4000, 8, 8, 1))
  draws = stage.two_step_draws(jax.random.PRNGKey(3), x)
  assert set(draws) == {"t_mid"}
  assert set(np.unique(np.asarray(draws["t_mid"])).tolist()) == {0.0, np.float32(0.4)}
  assert abs(float(jnp.mean(draws["t_mid"] > 0)) - 0.25) < 0.03
  config.distribution.two_step_path = "renoised"
  draws = _stage_and_params(config)[0].two_step_draws(jax.random.PRNGKey(3), x)
  assert draws["renoise"].shape == x.shape and abs(float(jnp.std(draws["renoise"])) - 1) < 0.01
  config.distribution.two_step_fraction = 0.0
  assert _stage_and_params(config)[0].two_step_draws(jax.random.PRNGKey(3), x) == {}


def test_a_spread_draws_each_rows_intermediate_time():
  """two_step_mid_spread = s: the two-step rows' m spread uniformly over [mid - s, mid + s],
  the same rows picked as with a fixed m, the one-step rows still 0."""
  config = tiny()
  config.distribution.update(two_step_fraction=0.5, two_step_mid=0.5)
  x = jnp.zeros((4000, 8, 8, 1))
  fixed = np.asarray(_stage_and_params(config)[0].two_step_draws(jax.random.PRNGKey(3), x)
                     ["t_mid"])
  config.distribution.two_step_mid_spread = 0.25
  drawn = np.asarray(_stage_and_params(config)[0].two_step_draws(jax.random.PRNGKey(3), x)
                     ["t_mid"])
  np.testing.assert_array_equal(drawn > 0, fixed > 0)
  m = drawn[drawn > 0]
  assert 0.25 <= m.min() < 0.27 and 0.73 < m.max() <= 0.75
  assert abs(m.mean() - 0.5) < 0.01 and abs(np.mean(m < 0.375) - 0.25) < 0.03


def test_two_step_rows_change_the_step_only_when_on():
  plain = one_step(tiny(class_dropout_prob=0.0), "distribution")
  config = tiny(class_dropout_prob=0.0)
  config.distribution.two_step_fraction = 0.0
  config.distribution.two_step_mid = 0.3  # unread while the fraction is 0
  same = one_step(config, "distribution")
  for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(same[1])):
    np.testing.assert_array_equal(a, b)
  config.distribution.two_step_fraction = 1.0
  metrics, state = one_step(config, "distribution")
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  assert metrics["critic_skipped"] == 0
  # The generator's loss and gradient, and the fake network's (it learns from the two-step
  # samples too), are another step's, not a rounding apart.
  for key in ("loss", "grad_norm", "fake_flow_matching_mse", "fake_grad_norm"):
    assert abs(metrics[key] - plain[0][key]) > 1e-3 * abs(plain[0][key]), key
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.fake_params),
                                                  jax.tree.leaves(plain[1].fake_params))]
  assert sum(moved) > len(moved) // 2


@pytest.mark.parametrize("key, value", [("two_step_fraction", 1.5), ("two_step_fraction", -0.1),
                                        ("two_step_mid", 1.0), ("two_step_mid", 0.0),
                                        ("two_step_path", "uniform"),
                                        ("two_step_mid_spread", 0.5),
                                        ("two_step_mid_spread", -0.1)])
def test_bad_two_step_settings_are_named(key, value):
  config = tiny()
  config.distribution[key] = value
  with pytest.raises(ConfigError, match=f"distribution.{key}"):
    validate_config(config)
