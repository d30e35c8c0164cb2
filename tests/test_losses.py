"""Tests of the hierdistill.losses contract (DESIGN.md) against closed forms and finite differences.

References are computed in float64 NumPy, independently of the library; gradients are checked by
central differences of those references. Every test runs on images (B, H, W, C) and vectors
(B, D).
"""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill import losses

SHAPES = [(4, 3, 3, 2), (5, 3)]
shapes = pytest.mark.parametrize("shape", SHAPES, ids=["BHWC", "BD"])


def _rand(seed, shape, scale=1.0):
  """float32 draws, so the float64 references see exactly the values JAX sees."""
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _times(seed, b):
  """(r, t) with r <= t, one pair with r == t and one with t - r large."""
  rng = np.random.default_rng(seed)
  a, c = rng.uniform(0.05, 0.95, b), rng.uniform(0.05, 0.95, b)
  r, t = np.minimum(a, c), np.maximum(a, c)
  r[0] = t[0]
  r[1], t[1] = 0.02, 0.98
  return r.astype(np.float32), t.astype(np.float32)


def _col(t, like):
  t = np.asarray(t)
  return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def fd_grad(f, params, h=1e-6):
  """Central differences of a float64 function of a dict of float64 arrays."""
  grads = {}
  for name, p in params.items():
    g = np.zeros_like(p)
    for idx in np.ndindex(p.shape):
      plus = {k: v.copy() for k, v in params.items()}
      minus = {k: v.copy() for k, v in params.items()}
      plus[name][idx] += h
      minus[name][idx] -= h
      g[idx] = (f(plus) - f(minus)) / (2 * h)
    grads[name] = g
  return grads


def assert_tree_close(actual, expected, rtol=1e-4, atol=1e-6):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol),
               actual, expected)


# ----- interpolate -----


@shapes
def test_interpolate(shape):
  x, e = _rand(0, shape), _rand(1, shape)
  t = np.linspace(0.0, 1.0, shape[0]).astype(np.float32)
  z = losses.interpolate(x, e, t)
  np.testing.assert_allclose(z, (1 - _col(t, x)) * _f64(x) + _col(t, x) * _f64(e), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(z[0], x[0])  # t = 0 is data
  np.testing.assert_array_equal(z[-1], e[-1])  # t = 1 is noise
  # dz/dt = e - x: the velocity of the path.
  _, dz_dt = jax.jvp(lambda t_: losses.interpolate(x, e, t_), (jnp.asarray(t),),
                     (jnp.ones_like(t),))
  np.testing.assert_allclose(dz_dt, e - x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(losses.interpolate)(x, e, t), z, rtol=1e-6, atol=1e-6)


def test_interpolate_keeps_the_input_dtype():
  # Not a loss: it builds model inputs, so (as documented) bfloat16 in gives bfloat16 out.
  x, e, t = _rand(0, (4, 3)), _rand(1, (4, 3)), np.float32([0.1, 0.4, 0.6, 0.9])
  z = losses.interpolate(*(jnp.asarray(a, jnp.bfloat16) for a in (x, e, t)))
  assert z.dtype == jnp.bfloat16
  np.testing.assert_allclose(z.astype(jnp.float32), losses.interpolate(x, e, t), atol=3e-2)


# ----- flow matching -----


def _linear_v(params, z, t):
  """v(z, t) = z W + c t, W: (C, C), c: (C,), over the last axis; works in NumPy and JAX."""
  return z @ params["W"] + params["c"] * t.reshape(t.shape + (1,) * (z.ndim - 1))


def _fm_params(shape, seed=2):
  c = shape[-1]
  return {"W": _rand(seed, (c, c)), "c": _rand(seed + 1, (c,))}


def _np_flow_matching(params, x, e, t):
  z = (1 - _col(t, x)) * x + _col(t, x) * e
  return np.mean((_linear_v(params, z, t) - (e - x)) ** 2)


@shapes
def test_flow_matching_loss_value(shape):
  x, e = _rand(0, shape), _rand(1, shape)
  t = np.random.default_rng(3).uniform(0, 1, shape[0]).astype(np.float32)
  params = _fm_params(shape)
  loss, metrics = losses.flow_matching_loss(lambda z, t_: _linear_v(params, z, t_), x, e, t)
  expected = _np_flow_matching(_f64(params), *_f64((x, e, t)))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(metrics["flow_matching_mse"], expected, rtol=1e-5)


@shapes
def test_flow_matching_loss_grad_by_finite_differences(shape):
  x, e = _rand(0, shape), _rand(1, shape)
  t = np.random.default_rng(3).uniform(0, 1, shape[0]).astype(np.float32)
  params = _fm_params(shape)
  loss_fn = lambda p: losses.flow_matching_loss(lambda z, t_: _linear_v(p, z, t_), x, e, t)[0]
  grads = jax.grad(loss_fn)(params)
  fd = fd_grad(lambda p: _np_flow_matching(p, *_f64((x, e, t))), _f64(params))
  assert_tree_close(grads, fd)
  # Also the model's inputs: v_fn must be fed z_t = (1 - t) x + t e and t itself.
  seen = {}

  def v_fn(z, t_):
    seen["z"], seen["t"] = z, t_
    return jnp.zeros_like(z)

  losses.flow_matching_loss(v_fn, x, e, t)
  np.testing.assert_allclose(seen["z"], losses.interpolate(x, e, t), rtol=1e-6)
  np.testing.assert_array_equal(seen["t"], t)


# ----- MeanFlow -----
# u(z, r, t) = a (t - r) tanh(z W) + b sin(t) z + c r, elementwise in the batch, mixing channels
# through W. Along the trajectory (dz/dt = v, dr/dt = 0, dt/dt = 1):
#   du/dt = a (t - r) (1 - tanh^2(z W)) (v W) + a tanh(z W) + b sin(t) v + b cos(t) z.
# The c r term makes du/dt wrong if r is given a nonzero tangent.


def _mf_params(shape, seed=5):
  c = shape[-1]
  return {"a": np.float32(0.8), "b": np.float32(-0.6), "c": np.float32(0.5),
          "W": _rand(seed, (c, c), 0.7)}


def _u(params, z, r, t, xp):
  tr = (t - r).reshape(t.shape + (1,) * (z.ndim - 1))
  t_, r_ = (a.reshape(a.shape + (1,) * (z.ndim - 1)) for a in (t, r))
  return (params["a"] * tr * xp.tanh(z @ params["W"]) + params["b"] * xp.sin(t_) * z
          + params["c"] * r_ * xp.ones_like(z))


def _np_du_dt(params, z, r, t, v):
  a, b, w = params["a"], params["b"], params["W"]
  th = np.tanh(z @ w)
  return (a * _col(t - r, z) * (1 - th ** 2) * (v @ w) + a * th + b * np.sin(_col(t, z)) * v
          + b * np.cos(_col(t, z)) * z)


def _np_target(params, z, r, t, v):
  return v - _col(t - r, z) * _np_du_dt(params, z, r, t, v)


def _mf_inputs(shape):
  z, v = _rand(6, shape), _rand(7, shape)
  r, t = _times(8, shape[0])
  return z, r, t, v


def _u_fn(params):
  return lambda z, r, t: _u(params, z, r, t, jnp)


@shapes
def test_meanflow_target_closed_form(shape):
  params = _mf_params(shape)
  z, r, t, v = _mf_inputs(shape)
  u, u_tgt = losses.meanflow_target(_u_fn(params), z, r, t, v)
  p64, (z64, r64, t64, v64) = _f64(params), _f64((z, r, t, v))
  np.testing.assert_allclose(u, _u(p64, z64, r64, t64, np), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(u_tgt, _np_target(p64, z64, r64, t64, v64), rtol=1e-5, atol=1e-5)
  assert u.dtype == u_tgt.dtype == jnp.float32 and u.shape == u_tgt.shape == shape
  # Where r == t (sample 0) the target is the instantaneous velocity itself.
  np.testing.assert_allclose(u_tgt[0], v[0], rtol=1e-6)


def test_meanflow_target_makes_one_jvp():
  # The contract: ONE jax.jvp. A forward-mode product calls u_fn once; finite differences or
  # a separate primal pass would call it more often.
  calls = []

  def u_fn(z, r, t):
    calls.append(1)
    return _u(_mf_params((4, 3)), z, r, t, jnp)

  with jax.disable_jit():
    losses.meanflow_target(u_fn, *_mf_inputs((4, 3)))
  assert len(calls) == 1


@shapes
def test_meanflow_target_carries_no_gradient(shape):
  params = _mf_params(shape)
  z, r, t, v = _mf_inputs(shape)
  probe = _rand(9, shape)

  def tgt_sum(p, z_, v_):
    return jnp.sum(probe * losses.meanflow_target(_u_fn(p), z_, r, t, v_)[1])

  grads = jax.grad(tgt_sum, argnums=(0, 1, 2))(params, z, v)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, np.zeros_like(g))
  # u does carry the gradient: d sum(probe u) / da = sum(probe (t - r) tanh(z W)).
  g_a = jax.grad(lambda p: jnp.sum(probe * losses.meanflow_target(_u_fn(p), z, r, t, v)[0]))(
      params)["a"]
  z64 = _f64(z)
  expected = np.sum(probe * _col(_f64(t - r), z64) * np.tanh(z64 @ _f64(params["W"])))
  np.testing.assert_allclose(g_a, expected, rtol=1e-5)


def _np_meanflow_loss(params, z, r, t, v, p, eps, frozen=None):
  """The loss in float64. With frozen = (u_tgt, w) those are held fixed (the stop_gradients)."""
  u = _u(params, z, r, t, np)
  u_tgt, w = frozen if frozen is not None else (_np_target(params, z, r, t, v), None)
  d = np.sum((u - u_tgt) ** 2, axis=tuple(range(1, z.ndim)))
  if w is None:
    w = 1.0 / (d + eps) ** p
  return np.mean(w * d), u, u_tgt, d, w


@shapes
@pytest.mark.parametrize("p, eps", [(1.0, 1e-3), (0.5, 1e-2), (0.0, 1e-3), (1.0, 10.0)])
def test_meanflow_loss_value_and_metrics(shape, p, eps):
  params = _mf_params(shape)
  z, r, t, v = _mf_inputs(shape)
  loss, metrics = losses.meanflow_loss(_u_fn(params), z, r, t, v, p=p, eps=eps)
  expected, _, _, d, _ = _np_meanflow_loss(_f64(params), *_f64((z, r, t, v)), p, eps)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["meanflow_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["meanflow_sq_error"], np.mean(d), rtol=1e-5)
  np.testing.assert_allclose(metrics["meanflow_mse"], np.mean(d) / np.prod(shape[1:]), rtol=1e-5)


@shapes
def test_meanflow_loss_p_and_eps(shape):
  params = _mf_params(shape)
  args = (_u_fn(params),) + _mf_inputs(shape)
  loss = lambda **kw: float(losses.meanflow_loss(*args, **kw)[0])
  d_mean = float(losses.meanflow_loss(*args)[1]["meanflow_sq_error"])
  assert d_mean > 0.1  # so that the comparisons below mean something
  np.testing.assert_allclose(loss(p=0.0), d_mean, rtol=1e-6)  # p = 0: plain sum of squares
  assert abs(loss(p=1.0, eps=1e-6) - 1.0) < 1e-3  # p = 1: d / (d + eps) ~ 1 when d >> eps
  # A larger eps damps the weight of small errors less: d / (d + eps) falls as eps grows.
  assert loss(p=1.0, eps=1.0) < loss(p=1.0, eps=0.1) < loss(p=1.0, eps=1e-3)


@shapes
@pytest.mark.parametrize("p", [1.0, 0.5])
def test_meanflow_loss_gradient(shape, p):
  eps = 1e-3
  params = _mf_params(shape)
  z, r, t, v = _mf_inputs(shape)
  grads = jax.grad(lambda q: losses.meanflow_loss(_u_fn(q), z, r, t, v, p=p, eps=eps)[0])(params)

  # 1. By hand in JAX: mean(sg(w) * d) with the target held fixed.
  u_tgt = losses.meanflow_target(_u_fn(params), z, r, t, v)[1]

  def by_hand(q, stop_weight=True):
    d = jnp.sum((_u(q, z, r, t, jnp) - u_tgt) ** 2, axis=tuple(range(1, z.ndim)))
    w = 1.0 / (d + eps) ** p
    return jnp.mean((jax.lax.stop_gradient(w) if stop_weight else w) * d)

  assert_tree_close(grads, jax.grad(by_hand)(params))
  # ... and it is not the gradient of the un-stopped weight (which would differ by a factor
  # eps / (d + eps) at p = 1): the test can tell the two apart.
  g_unstopped = jax.grad(lambda q: by_hand(q, stop_weight=False))(params)
  assert not np.allclose(grads["a"], g_unstopped["a"], rtol=1e-2)

  # 2. Analytic: dL/dtheta = mean_b 2 w_b sum_i (u - u_tgt)_bi du_bi/dtheta, with
  # du/da = (t - r) tanh(z W), du/db = sin(t) z, du/dc = r.
  p64, (z64, r64, t64, v64) = _f64(params), _f64((z, r, t, v))
  _, u, u_tgt64, _, w = _np_meanflow_loss(p64, z64, r64, t64, v64, p, eps)
  du = {"a": _col(t64 - r64, z64) * np.tanh(z64 @ p64["W"]),
        "b": np.sin(_col(t64, z64)) * z64,
        "c": _col(r64, z64) * np.ones_like(z64)}
  axes = tuple(range(1, z.ndim))
  for name, du_dtheta in du.items():
    analytic = np.mean(2 * w * np.sum((u - u_tgt64) * du_dtheta, axis=axes))
    np.testing.assert_allclose(grads[name], analytic, rtol=1e-4, atol=1e-6)

  # 3. Finite differences of the float64 loss with target and weight frozen at params, which is
  # what the stop_gradients mean; this covers W too.
  frozen = (u_tgt64, w)
  fd = fd_grad(lambda q: _np_meanflow_loss(q, z64, r64, t64, v64, p, eps, frozen)[0], p64)
  assert_tree_close(grads, fd)


def test_adaptive_weighted_loss():
  d = jnp.array([0.0, 0.5, 2.0, 10.0])
  np.testing.assert_allclose(losses.adaptive_weighted_loss(d, p=1.0, eps=0.1),
                             np.mean(np.float64([0, 0.5, 2, 10]) / (np.float64([0, 0.5, 2, 10])
                                                                    + 0.1)), rtol=1e-6)
  g = jax.grad(lambda d_: losses.adaptive_weighted_loss(d_, p=1.0, eps=0.1))(d)
  np.testing.assert_allclose(g, 1.0 / (np.asarray(d) + 0.1) / 4, rtol=1e-6)


# ----- DMD -----


def _dmd_inputs(shape, smallest=0.01):
  """x, x_real, x_fake with per-sample normalisers spread from `smallest` to 10."""
  x, x_fake = _rand(10, shape), _rand(11, shape)
  scale = np.geomspace(smallest, 10.0, shape[0]).astype(np.float32)
  x_real = x - _col(scale, x) * _rand(12, shape)
  return x, x_real, x_fake


def _np_direction(x, x_real, x_fake):
  n = np.mean(np.abs(x - x_real), axis=tuple(range(1, x.ndim)))
  return (x_fake - x_real) / _col(n, x), n


@shapes
def test_dmd_loss_value_gradient_and_normaliser(shape):
  x, x_real, x_fake = _dmd_inputs(shape)
  loss, metrics = losses.dmd_loss(x, x_real, x_fake)
  g, n = _np_direction(*_f64((x, x_real, x_fake)))
  np.testing.assert_allclose(loss, 0.5 * np.mean(g ** 2), rtol=1e-5)
  np.testing.assert_allclose(metrics["dmd_normaliser"], np.mean(n), rtol=1e-5)
  np.testing.assert_allclose(metrics["dmd_direction_rms"], np.sqrt(np.mean(g ** 2)), rtol=1e-5)
  grad_x, grad_real, grad_fake = jax.grad(
      lambda *a: losses.dmd_loss(*a)[0], argnums=(0, 1, 2))(x, x_real, x_fake)
  # d loss / d x = g / x.size, with the per-sample normaliser (a batch-wide one would fail on
  # these inputs, whose n range over 1000x).
  np.testing.assert_allclose(grad_x, g / x.size, rtol=1e-5, atol=1e-12)
  # The denoised estimates are constants.
  np.testing.assert_array_equal(grad_real, np.zeros(shape))
  np.testing.assert_array_equal(grad_fake, np.zeros(shape))


@shapes
def test_dmd_loss_zero_normaliser(shape):
  x, x_real, x_fake = _dmd_inputs(shape)
  x_real[1] = x[1]  # n_1 = 0: the generator sample already equals the real denoised estimate
  x_fake[1] = x[1] + 1.0  # so the direction would be +inf there
  x_real[2] = x_fake[2] = x[2]  # and 0 / 0 = nan here
  loss, metrics = losses.dmd_loss(x, x_real, x_fake)
  grad = jax.grad(lambda x_: losses.dmd_loss(x_, x_real, x_fake)[0])(x)
  assert np.isfinite(loss) and all(np.isfinite(m) for m in metrics.values())
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[1:3], np.zeros((2,) + shape[1:]))
  with np.errstate(divide="ignore", invalid="ignore"):
    g, _ = _np_direction(*_f64((x, x_real, x_fake)))
  g[1:3] = 0.0
  np.testing.assert_allclose(grad, g / x.size, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(loss, 0.5 * np.mean(g ** 2), rtol=1e-5)


# ----- adversarial -----


def _softplus(x):
  return np.logaddexp(0.0, x)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_discriminator_loss():
  real = np.float32([2.0, -1.0, 0.3, 80.0, -80.0, 0.0])
  fake = np.float32([-3.0, 0.5, 80.0, -80.0])  # another size: the two means are separate
  loss, metrics = losses.discriminator_loss(real, fake)
  r64, f64 = _f64((real, fake))
  expected = np.mean(_softplus(-r64)) + np.mean(_softplus(f64))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["disc_loss"], expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["disc_accuracy"], 0.5 * (3 / 6 + 2 / 4), rtol=1e-6)
  g_real, g_fake = jax.grad(lambda a, b: losses.discriminator_loss(a, b)[0], argnums=(0, 1))(
      real, fake)
  np.testing.assert_allclose(g_real, -_sigmoid(-r64) / real.size, rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(g_fake, _sigmoid(f64) / fake.size, rtol=1e-5, atol=1e-30)
  assert np.all(np.isfinite(g_real)) and np.all(np.isfinite(g_fake))


def test_generator_adversarial_loss():
  fake = np.float32([-3.0, 0.5, 0.0, 80.0, -80.0])
  loss, metrics = losses.generator_adversarial_loss(fake)
  f64 = _f64(fake)
  np.testing.assert_allclose(loss, np.mean(_softplus(-f64)), rtol=1e-6)
  np.testing.assert_allclose(metrics["gen_adv_loss"], loss)
  grad = jax.grad(lambda a: losses.generator_adversarial_loss(a)[0])(fake)
  np.testing.assert_allclose(grad, -_sigmoid(-f64) / fake.size, rtol=1e-5, atol=1e-30)


# ----- guidance -----


@shapes
def test_guided_velocity(shape):
  v_c, v_u = _rand(13, shape), _rand(14, shape)
  c64, u64 = _f64((v_c, v_u))
  out = losses.guided_velocity(v_c, v_u, 2.5)
  np.testing.assert_allclose(out, u64 + 2.5 * (c64 - u64), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(losses.guided_velocity(v_c, v_u, 1.0), v_c, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(losses.guided_velocity(v_c, v_u, 0.0), v_u)
  w = np.linspace(0.0, 4.0, shape[0]).astype(np.float32)
  out = losses.guided_velocity(v_c, v_u, w)
  assert out.dtype == jnp.float32 and out.shape == shape
  np.testing.assert_allclose(out, u64 + _col(w, u64) * (c64 - u64), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(losses.guided_velocity)(v_c, v_u, w), out, rtol=1e-6)


# ----- dtypes, jit, imports -----


def _cases(shape):
  """name -> (function of arrays returning the loss or output, its array arguments)."""
  x, e = _rand(0, shape), _rand(1, shape)
  r, t = _times(8, shape[0])
  fm, mf = _fm_params(shape), _mf_params(shape)
  return {
      "flow_matching_loss": (
          lambda x_, e_, t_: losses.flow_matching_loss(lambda z, s: _linear_v(fm, z, s),
                                                       x_, e_, t_)[0], (x, e, t)),
      "meanflow_target": (
          lambda z, r_, t_, v: losses.meanflow_target(_u_fn(mf), z, r_, t_, v),
          _mf_inputs(shape)),
      "meanflow_loss": (
          lambda z, r_, t_, v: losses.meanflow_loss(_u_fn(mf), z, r_, t_, v)[0],
          _mf_inputs(shape)),
      # n >= 0.5: a normaliser of 0.01 |x| is below bfloat16's resolution of x itself.
      "dmd_loss": (lambda *a: losses.dmd_loss(*a)[0], _dmd_inputs(shape, smallest=0.5)),
      "discriminator_loss": (lambda a, b: losses.discriminator_loss(a, b)[0],
                             (_rand(15, shape[:1]), _rand(16, shape[:1]))),
      "generator_adversarial_loss": (lambda a: losses.generator_adversarial_loss(a)[0],
                                     (_rand(17, shape[:1]),)),
      "guided_velocity": (lambda a, b, w: losses.guided_velocity(a, b, w),
                          (_rand(13, shape), _rand(14, shape), r + 1.0)),
  }


CASES = list(_cases(SHAPES[1]))


@shapes
@pytest.mark.parametrize("name", CASES)
def test_bfloat16_inputs_give_float32(shape, name):
  fn, args = _cases(shape)[name]
  args_bf16 = tuple(jnp.asarray(a, jnp.bfloat16) for a in args)
  out = fn(*args_bf16)
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.float32, name
  # Exactly the float32 computation on the same (bfloat16-representable) values: a loss that
  # computed in bfloat16 and cast at the end would miss this by ~1e-2.
  same_values = fn(*(a.astype(jnp.float32) for a in args_bf16))
  assert_tree_close(out, jax.tree.map(np.asarray, same_values), rtol=1e-5, atol=1e-5)
  # And close to the float32 computation on the original inputs (bfloat16 keeps ~3 digits).
  assert_tree_close(out, jax.tree.map(np.asarray, fn(*args)), rtol=0.1, atol=0.1)


@shapes
@pytest.mark.parametrize("name", CASES)
def test_jit_matches_eager(shape, name):
  fn, args = _cases(shape)[name]
  assert_tree_close(jax.jit(fn)(*args), jax.tree.map(np.asarray, fn(*args)), rtol=1e-5,
                    atol=1e-6)


def test_import_is_pure_jax():
  # In a fresh interpreter: this process has imported other things already.
  root = Path(__file__).resolve().parents[1]
  code = ("import sys, hierdistill.losses; "
          "print(sorted(m for m in ('flax', 'optax', 'tensorflow', 'hierdistill.models', "
          "'hierdistill.stages') if m in sys.modules))")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
