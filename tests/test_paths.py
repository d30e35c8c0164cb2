"""Tests of hierdistill.paths: time samplers, the guidance interval and the CFG helper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from hierdistill import paths

N = 20_000


def _logit(q):
  return np.log(q) - np.log1p(-q)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def r_t():
  r, t = jax.jit(lambda k: paths.sample_r_t(k, N))(jax.random.PRNGKey(0))
  return np.asarray(r), np.asarray(t)


def test_sample_t_is_logit_normal():
  mu, sigma = 0.3, 1.5
  t = np.asarray(paths.sample_t(jax.random.PRNGKey(1), N, mu=mu, sigma=sigma))
  assert t.shape == (N,) and t.dtype == np.float32
  assert np.all((t > 0) & (t < 1))
  # logit(t) ~ N(mu, sigma^2): its quantiles are mu + sigma z_q.
  for q in (0.1, 0.5, 0.9):
    expected = mu + sigma * float(norm.ppf(q))
    assert abs(np.quantile(_logit(t.astype(np.float64)), q) - expected) < 0.05


def test_r_le_t_and_shapes(r_t):
  r, t = r_t
  assert r.shape == t.shape == (N,)
  assert np.all(r <= t)
  assert np.all((t > 0) & (t < 1)) and np.all((r > 0) & (r < 1))


def test_equal_fraction_is_per_sample(r_t):
  r, t = r_t
  equal = r == t
  assert abs(equal.mean() - 0.75) < 0.03
  # Per sample, not per index range: both halves, and each of 8 contiguous device shards of a
  # sharded batch, see about the same fraction.
  for part in np.split(equal, 2):
    assert abs(part.mean() - 0.75) < 0.03
  for shard in np.split(equal, 8):
    assert abs(shard.mean() - 0.75) < 0.05
  # Interleaved indices too (a stride pattern would show here).
  assert abs(equal[::2].mean() - equal[1::2].mean()) < 0.03


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_equal_fraction_follows_argument(fraction):
  r, t = paths.sample_r_t(jax.random.PRNGKey(2), 4000, equal_fraction=fraction)
  assert abs(float(jnp.mean(r == t)) - fraction) < 0.03
  if fraction == 0.0:
    assert bool(jnp.all(r < t))


def test_equal_fraction_out_of_range():
  with pytest.raises(ValueError, match="equal_fraction"):
    paths.sample_r_t(jax.random.PRNGKey(0), 8, equal_fraction=1.5)


def test_t_is_max_of_two_logit_normals(r_t):
  # P(t <= q) = P(both draws <= q) = Phi((logit q - mu) / sigma)^2, so the p-quantile of t is
  # sigmoid(mu + sigma Phi^-1(sqrt(p))). The standard error of these quantiles at N = 20k is
  # ~0.003: a tolerance of 0.01 fails a single logit-normal (median 0.40 vs 0.536).
  _, t = r_t
  mu, sigma = -0.4, 1.0
  for p in (0.1, 0.5, 0.9):
    expected = _sigmoid(mu + sigma * float(norm.ppf(np.sqrt(p))))
    assert abs(np.quantile(t, p) - expected) < 0.01, (p, np.quantile(t, p), expected)


def test_r_is_min_of_two_logit_normals_where_distinct(r_t):
  # Where r < t, r is the smaller draw (the Bernoulli is independent of the draws):
  # P(r <= q) = 1 - (1 - Phi(.))^2, so the p-quantile is sigmoid(mu + sigma Phi^-1(1 - sqrt(1-p))).
  r, t = r_t
  r = r[r < t]
  mu, sigma = -0.4, 1.0
  for p in (0.1, 0.5, 0.9):
    expected = _sigmoid(mu + sigma * float(norm.ppf(1.0 - np.sqrt(1.0 - p))))
    assert abs(np.quantile(r, p) - expected) < 0.02, (p, np.quantile(r, p), expected)


def test_sample_r_t_is_deterministic_and_key_dependent():
  a = paths.sample_r_t(jax.random.PRNGKey(3), 64)
  b = paths.sample_r_t(jax.random.PRNGKey(3), 64)
  c = paths.sample_r_t(jax.random.PRNGKey(4), 64)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


def test_sample_r_t_under_sharded_jit_matches_unsharded():
  # With jax_threefry_partitionable (conftest), a batch sharded over the 8 fake devices draws
  # the same numbers as one device (up to an ulp: jit fuses the sigmoid differently from eager).
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  fn = jax.jit(lambda k: paths.sample_r_t(k, 1024), out_shardings=(sharding, sharding))
  r_s, t_s = fn(jax.random.PRNGKey(5))
  r, t = paths.sample_r_t(jax.random.PRNGKey(5), 1024)
  np.testing.assert_allclose(r_s, r, rtol=1e-6)
  np.testing.assert_allclose(t_s, t, rtol=1e-6)
  np.testing.assert_array_equal(r_s == t_s, r == t)


def test_guidance_scale():
  t = jnp.array([0.0, 0.1, 0.2, 0.5, 0.7, 0.71, 1.0])
  np.testing.assert_array_equal(paths.guidance_scale(t, 3.0), np.full(7, 3.0, np.float32))
  got = paths.guidance_scale(t, 3.0, (0.2, 0.7))
  assert got.dtype == jnp.float32 and got.shape == t.shape
  # Both ends of the interval belong to it.
  np.testing.assert_array_equal(got, [1.0, 1.0, 3.0, 3.0, 3.0, 1.0, 1.0])


class CountingModel:
  """An un-jitted v_fn(z, t, y) that records every call; its output depends on z, t and y."""

  def __init__(self):
    self.calls = []

  def __call__(self, z, t, y):
    self.calls.append((z.shape[0], np.asarray(y)))
    scale = (1.0 + y.astype(jnp.float32))[:, None]
    return scale * z * (1.0 + t[:, None]) + y.astype(jnp.float32)[:, None]


NULL = 10


@pytest.fixture
def zty():
  z = jax.random.normal(jax.random.PRNGKey(6), (6, 4))
  t = jnp.array([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
  y = jnp.array([0, 1, 2, 3, 4, 5])
  return z, t, y


@pytest.mark.parametrize("w", [0.0, 1.5, 4.0])
def test_cfg_velocity_two_pass_formula(zty, w):
  z, t, y = zty
  model = CountingModel()
  v = paths.cfg_velocity(model, z, t, y, w=w, null=NULL)
  ref = CountingModel()
  v_c, v_u = ref(z, t, y), ref(z, t, jnp.full_like(y, NULL))
  np.testing.assert_allclose(v, v_u + w * (v_c - v_u), rtol=1e-6, atol=1e-6)
  assert v.dtype == jnp.float32
  # Two passes' worth of rows, and the unconditional rows carry the null label.
  assert sum(rows for rows, _ in model.calls) == 2 * z.shape[0]
  labels = np.concatenate([labels for _, labels in model.calls])
  assert np.sum(labels == NULL) == z.shape[0]


def test_cfg_velocity_interval(zty):
  z, t, y = zty
  model = CountingModel()
  v = paths.cfg_velocity(model, z, t, y, w=3.0, null=NULL, interval=(0.3, 0.7))
  v_c, v_u = model(z, t, y), model(z, t, jnp.full_like(y, NULL))
  inside = np.asarray((t >= 0.3) & (t <= 0.7))[:, None]
  np.testing.assert_allclose(v, np.where(inside, v_u + 3.0 * (v_c - v_u), v_c), rtol=1e-6,
                             atol=1e-6)


def test_cfg_velocity_skips_unconditional_pass_at_w_1(zty):
  z, t, y = zty
  model = CountingModel()
  v = paths.cfg_velocity(model, z, t, y, w=1.0, null=NULL)
  assert len(model.calls) == 1 and model.calls[0][0] == z.shape[0]
  assert not np.any(model.calls[0][1] == NULL)
  np.testing.assert_allclose(v, model(z, t, y), rtol=1e-6)
  assert v.dtype == jnp.float32


def test_cfg_velocity_jits_and_takes_images():
  z = jax.random.normal(jax.random.PRNGKey(7), (3, 4, 4, 2))
  t = jnp.array([0.1, 0.5, 0.9])
  y = jnp.array([1, 2, 3])
  model = lambda z_, t_, y_: z_ * (t_ + y_)[:, None, None, None]
  fn = jax.jit(lambda z_, t_, y_: paths.cfg_velocity(model, z_, t_, y_, w=2.0, null=0,
                                                     interval=(0.0, 0.6)))
  v = fn(z, t, y)
  v_c, v_u = model(z, t, y), model(z, t, jnp.zeros_like(y))
  w = jnp.array([2.0, 2.0, 1.0])[:, None, None, None]
  np.testing.assert_allclose(v, v_u + w * (v_c - v_u), rtol=1e-6, atol=1e-6)


def test_cfg_velocity_guides_only_the_first_channels_when_asked(zty):
  """DiT's and SiT's forward_with_cfg guide latent channels 0-2 and leave channel 3
  conditional: guided_channels=3 reproduces that; None guides all four."""
  z, t, y = zty
  model = CountingModel()
  v_c, v_u = model(z, t, y), model(z, t, jnp.full_like(y, NULL))
  full = paths.cfg_velocity(model, z, t, y, w=4.0, null=NULL)
  three = paths.cfg_velocity(model, z, t, y, w=4.0, null=NULL, guided_channels=3)
  np.testing.assert_allclose(three[:, :3], full[:, :3], rtol=1e-6)
  np.testing.assert_allclose(three[:, 3], v_c[:, 3], rtol=1e-6)
  assert not np.allclose(full[:, 3], v_c[:, 3])  # the model's two passes differ there
  np.testing.assert_allclose(full, v_u + 4.0 * (v_c - v_u), rtol=1e-6, atol=1e-6)


def test_pair_rows_interleaves_and_unpairs():
  a = jnp.arange(6.0).reshape(3, 2)
  b = -a
  ab = paths.pair_rows(a, b)
  np.testing.assert_array_equal(ab[0::2], a)  # row i's pair sits beside it: 2i and 2i + 1
  np.testing.assert_array_equal(ab[1::2], b)
  a2, b2 = paths.unpair_rows(ab)
  np.testing.assert_array_equal(a2, a)
  np.testing.assert_array_equal(b2, b)


def test_reexports():
  x, e, t = jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.array([0.25, 1.0])
  np.testing.assert_allclose(paths.interpolate(x, e, t), [[0.75] * 3, [0.0] * 3])
