"""Tests of hierdistill.models: DiT/SiT backbone, toy MLP, AWD head, student init, registry.

Tiny models everywhere except the two size checks (DiT-S/2 forward; DiT-XL/2 param count, with
jax.eval_shape so nothing is allocated). Compile time dominates on these CPUs, so inputs and
params come from numpy, each check runs as one jitted program, and only the bitwise
student == teacher check runs op by op.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from hierdistill import models
from hierdistill.models import (DiT, MLPFlow, TokenDiscriminatorHead, build, build_discriminator,
                                dit_config, init_student_from_teacher, token_weight_entropy)
from hierdistill.models.dit import sincos_pos_embed_2d, unpatchify
from hierdistill.models.embeddings import LabelEmbedder

NUM_CLASSES = 10
TINY_DIT = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                num_classes=NUM_CLASSES)
TINY_MLP = dict(width=32, depth=3, num_classes=NUM_CLASSES, frequency_size=32)


def random_params(model, *args, scale=0.05, seed=0):
  """Random "trained-looking" params (zero-init ones included: a fresh adaLN-Zero DiT outputs
  exactly 0) without running init: jax.eval_shape gives the tree, numpy fills it."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), shapes)


def param_shapes(model, z, t, y):
  return jax.eval_shape(model.init, jax.random.key(0), z, t, t, y)["params"]


def dit_inputs(batch=3, size=8, channels=4, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((batch, size, size, channels)).astype(dtype)
  t = rng.uniform(0.2, 1.0, (batch,)).astype(dtype)
  r = (t * rng.uniform(0.0, 0.9, (batch,))).astype(dtype)
  y = rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)
  return jnp.asarray(z), jnp.asarray(r), jnp.asarray(t), jnp.asarray(y)


def mlp_inputs(batch=5, dim=2, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((batch, dim)).astype(np.float32)
  t = rng.uniform(0.2, 1.0, (batch,)).astype(np.float32)
  r = (t * rng.uniform(0.0, 0.9, (batch,))).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)
  return jnp.asarray(z), jnp.asarray(r), jnp.asarray(t), jnp.asarray(y)


def jit_apply(model, **kwargs):
  """jax.jit of (params, z, r, t, y) -> model.apply(...)."""
  return jax.jit(lambda p, z, r, t, y: model.apply({"params": p}, z, r, t, y, **kwargs))


# ----------------------------------------------------------------------------------------------
# DiT: sizes, shapes, layout


def test_dit_s2_forward_jit_on_latents():
  model = DiT(input_size=32, in_channels=4, num_classes=1000, **dit_config("DiT-S/2"))
  z, r, t, _ = dit_inputs(batch=8, size=32)
  y = jnp.arange(8) * 100
  params = random_params(model, z, None, t, y)
  v = jit_apply(model)(params, z, None, t, y)
  assert v.shape == (8, 32, 32, 4) and v.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(v))) and float(jnp.std(v)) > 0


def test_dit_xl2_param_count_matches_published():
  model = DiT(input_size=32, in_channels=4, num_classes=1000, out_channels=8,
              interval_conditioning=False, **dit_config("DiT-XL/2"))
  z = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), z, None, t, y)
  count = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes))
  assert abs(count - 675e6) / 675e6 < 0.01
  # Exactly DiT's 675,129,632 less its fixed (256 x 1152) position table, a constant here: the
  # layout maps one to one onto the published checkpoint.
  assert count == 675_129_632 - 256 * 1152


def test_dit_config_names():
  assert dit_config("DiT-XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
  assert dit_config("SiT-B/4") == dict(depth=12, hidden_size=768, num_heads=12, patch_size=4)
  assert dit_config("L/8")["patch_size"] == 8
  assert dit_config("S") == dict(depth=12, hidden_size=384, num_heads=6)
  with pytest.raises(ValueError, match="DiT size"):
    dit_config("XXL/2")
  with pytest.raises(ValueError, match="patch"):
    dit_config("XL/3")


def test_time_embedding_input_mapping():
  t = jnp.array([0.0, 0.25, 1.0])
  np.testing.assert_allclose(DiT(**TINY_DIT).time_embedding_input(t), 1000.0 * t)  # DiT
  sit = DiT(time_scale=1.0, time_flip=True, **TINY_DIT)  # SiT: t' = 1 - t in [0, 1]
  np.testing.assert_allclose(sit.time_embedding_input(t), 1.0 - t)


def test_pos_embed_and_unpatchify_layout():
  # Row i, column j -> token i * g + j; the first half of the features encodes j.
  emb = sincos_pos_embed_2d(16, 3)
  assert emb.shape == (9, 16)
  # 16 / 4 = 4 frequencies 10000^(-k / 4) per axis, [sin | cos].
  np.testing.assert_allclose(emb[1, :4], np.sin([1.0, 1e-1, 1e-2, 1e-3]), rtol=1e-6)
  np.testing.assert_allclose(emb[1, 4:8], np.cos([1.0, 1e-1, 1e-2, 1e-3]), rtol=1e-6)
  np.testing.assert_allclose(emb[3, 8:12], np.sin([1.0, 1e-1, 1e-2, 1e-3]), rtol=1e-6)
  np.testing.assert_array_equal(emb[3, :4], 0.0)
  # unpatchify inverts the conv patchify's order: tokens row-major, features (p, q, c).
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  p = 2
  tokens = x.reshape(2, 4, p, 4, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, p * p * 3)
  np.testing.assert_array_equal(unpatchify(tokens, p, 3), x)


def test_learn_sigma_returns_first_channels():
  model = DiT(out_channels=8, **TINY_DIT)
  z, r, t, y = dit_inputs()
  flat = traverse_util.flatten_dict(random_params(model, z, r, t, y))
  # final bias laid out as (p, q, c_out): the prediction channels 1, the "sigma" channels 2.
  flat[("final_layer", "linear", "kernel")] *= 0.0
  flat[("final_layer", "linear", "bias")] = jnp.tile(
      jnp.array([1.0] * 4 + [2.0] * 4), 4)
  v = jit_apply(model)(traverse_util.unflatten_dict(flat), z, r, t, y)
  assert v.shape == z.shape
  np.testing.assert_array_equal(v, 1.0)


def test_return_features_shapes_and_order():
  model = DiT(feature_layers=(1, 0, -1), **TINY_DIT)
  z, r, t, y = dit_inputs()
  params = random_params(model, z, r, t, y)

  @jax.jit
  def both(p):
    return (model.apply({"params": p}, z, r, t, y, return_features=True),
            model.apply({"params": p}, z, r, t, y))

  (v, feats), v_plain = both(params)
  assert v.shape == z.shape
  assert len(feats) == 3
  for f in feats:
    assert f.shape == (3, 16, 32) and f.dtype == jnp.float32
  np.testing.assert_array_equal(feats[0], feats[2])  # -1 is block 1
  assert float(jnp.max(jnp.abs(feats[0] - feats[1]))) > 0
  np.testing.assert_allclose(v_plain, v, rtol=1e-6, atol=1e-7)  # features change nothing
  mlp = MLPFlow(feature_layers=(0, 2), **TINY_MLP)
  zm, rm, tm, ym = mlp_inputs()
  pm = random_params(mlp, zm, rm, tm, ym)
  _, feats = jit_apply(mlp, return_features=True)(pm, zm, rm, tm, ym)
  assert [f.shape for f in feats] == [(5, 1, 32)] * 2


# ----------------------------------------------------------------------------------------------
# Forward-mode AD (MeanFlow's du/dt)


def test_dit_jvp_matches_finite_difference():
  """jax.jvp with tangents (v, 0, 1) == central difference of the same function.

  In float64: the time embedding's top frequency is 1000 rad per unit t, so a float32 central
  difference has no step small enough for its truncation error yet large enough for rounding.
  """
  with jax.enable_x64(True):
    model = DiT(interval_conditioning=True, dtype=jnp.float64, param_dtype=jnp.float64,
                **TINY_DIT)
    z, r, t, y = dit_inputs(dtype=np.float64)
    v_dir = jnp.asarray(np.random.default_rng(7).standard_normal(z.shape))
    params = random_params(model, z, r, t, y, scale=0.1)
    eps = 1e-6

    @jax.jit
    def jvp_and_fd(p):
      u_fn = lambda z_, r_, t_: model.apply({"params": p}, z_, r_, t_, y)
      u, du = jax.jvp(u_fn, (z, r, t), (v_dir, jnp.zeros_like(r), jnp.ones_like(t)))
      fd = (u_fn(z + eps * v_dir, r, t + eps) - u_fn(z - eps * v_dir, r, t - eps)) / (2 * eps)
      return u, du, fd

    u, du, fd = jvp_and_fd(params)
    assert u.dtype == du.dtype == jnp.float64
    assert float(jnp.max(jnp.abs(du))) > 1e-3
    np.testing.assert_allclose(du, fd, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(du))))


def test_dit_jvp_through_dot_product_attention_float32():
  """The optional attention='xla' path (jax.nn.dot_product_attention) also has a JVP."""
  model = DiT(interval_conditioning=True, attention="xla", **TINY_DIT)
  z, r, t, y = dit_inputs()
  params = random_params(model, z, r, t, y)
  u_fn = lambda z_, r_, t_: model.apply({"params": params}, z_, r_, t_, y)
  u, du = jax.jit(lambda: jax.jvp(u_fn, (z, r, t), (z, jnp.zeros_like(r), jnp.ones_like(t))))()
  assert u.shape == du.shape == z.shape and bool(jnp.all(jnp.isfinite(du)))


# ----------------------------------------------------------------------------------------------
# Student from teacher


def _student_teacher_case(kind):
  if kind == "dit":
    teacher, student = DiT(**TINY_DIT), DiT(interval_conditioning=True, **TINY_DIT)
    z, r, t, y = dit_inputs()
  else:
    teacher, student = MLPFlow(**TINY_MLP), MLPFlow(interval_conditioning=True, **TINY_MLP)
    z, r, t, y = mlp_inputs()
  return teacher, student, (z, r, t, y)


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_student_from_teacher_is_exact_at_init(kind):
  teacher, student, (z, r, t, y) = _student_teacher_case(kind)
  teacher_params = random_params(teacher, z, r, t, y, scale=0.1)
  # A real init (its interval embedder is new); an rbg key compiles faster than threefry here.
  fresh = jax.jit(student.init)(jax.random.key(5, impl="rbg"), z, t, t, y)["params"]
  assert "interval_embedder" in fresh and "interval_embedder" not in teacher_params
  params = init_student_from_teacher(fresh, teacher_params)

  # Op by op (no jit) the student repeats the teacher's computation and adds an exact 0.0, so
  # the results are bitwise equal. (Two separately jitted programs may fuse differently and
  # differ in the last bit: checked with a tolerance below.)
  v = teacher.apply({"params": teacher_params}, z, None, t, y)
  u_fn = lambda p, z, r, t, y: student.apply({"params": p}, z, r, t, y)
  assert float(jnp.std(v)) > 0
  np.testing.assert_array_equal(u_fn(params, z, t, t, y), v)  # u(z, t, t) == v(z, t)
  np.testing.assert_array_equal(u_fn(params, z, r, t, y), v)  # any r, at init
  np.testing.assert_array_equal(u_fn(params, z, None, t, y), v)  # r = None means r = t
  np.testing.assert_allclose(jax.jit(u_fn)(params, z, r, t, y), v, rtol=1e-5, atol=1e-6)

  # Once the interval embedder has learned something, r matters.
  moved = dict(params, interval_embedder=random_params(student, z, r, t, y, seed=6)[
      "interval_embedder"])
  assert float(jnp.max(jnp.abs(u_fn(moved, z, r, t, y) - v))) > 1e-4
  assert float(jnp.max(jnp.abs(u_fn(moved, z, 0.5 * r, t, y) - u_fn(moved, z, r, t, y)))) > 1e-4


def test_init_student_from_teacher_errors_name_the_path():
  z, r, t, y = dit_inputs()
  teacher = param_shapes(DiT(**TINY_DIT), z, t, y)  # works on abstract trees too
  wider = param_shapes(
      DiT(interval_conditioning=True, **dict(TINY_DIT, num_classes=NUM_CLASSES + 1)), z, t, y)
  with pytest.raises(ValueError, match="shape mismatch at 'y_embedder/embedding_table/embedding'"):
    init_student_from_teacher(wider, teacher)
  deeper_teacher = param_shapes(DiT(**dict(TINY_DIT, depth=3)), z, t, y)
  student = param_shapes(DiT(interval_conditioning=True, **TINY_DIT), z, t, y)
  with pytest.raises(ValueError, match="no param 'blocks_2/adaLN_modulation/bias'"):
    init_student_from_teacher(student, deeper_teacher)
  # The variables-dict form ({'params': ...}) is accepted for both.
  out = init_student_from_teacher({"params": student}, {"params": teacher})
  assert set(out["params"]) == set(student)


# ----------------------------------------------------------------------------------------------
# Labels, dtypes, remat


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_label_dropout_all_gives_null(kind):
  if kind == "dit":
    model = DiT(class_dropout_prob=1.0, **TINY_DIT)
    z, r, t, y = dit_inputs()
  else:
    model = MLPFlow(**dict(TINY_MLP, class_dropout_prob=1.0))
    z, r, t, y = mlp_inputs()
  params = random_params(model, z, r, t, y, scale=0.1)

  @jax.jit
  def outputs(p):
    apply = lambda y_, **kw: model.apply({"params": p}, z, r, t, y_, **kw)
    return (apply(y, train=True, rngs={"dropout": jax.random.key(9)}),
            apply(jnp.full_like(y, NUM_CLASSES)), apply(None),
            apply(y))  # train=False: no rng needed, no dropout

  dropped, null, none_label, labelled = outputs(params)
  np.testing.assert_array_equal(dropped, null)
  np.testing.assert_array_equal(none_label, null)
  assert float(jnp.max(jnp.abs(labelled - null))) > 1e-4


def test_label_dropout_is_per_sample():
  embedder = LabelEmbedder(num_classes=NUM_CLASSES, hidden_size=4, dropout_prob=0.5)
  y = jnp.zeros((1000,), jnp.int32)
  params = random_params(embedder, y, 1000)
  dropped = jax.jit(lambda p: embedder.apply({"params": p}, y, 1000, train=True,
                                             rngs={"dropout": jax.random.key(10)}))(params)
  table = params["embedding_table"]["embedding"]
  is_null = np.all(np.asarray(dropped) == np.asarray(table[NUM_CLASSES]), axis=-1)
  is_kept = np.all(np.asarray(dropped) == np.asarray(table[0]), axis=-1)
  assert np.all(is_null | is_kept)
  assert 430 <= is_null.sum() <= 570  # Bernoulli(0.5) per sample


def test_bfloat16_compute_close_to_float32_and_params_float32():
  z, r, t, y = dit_inputs()
  m32 = DiT(interval_conditioning=True, **TINY_DIT)
  m16 = DiT(interval_conditioning=True, dtype=jnp.bfloat16, **TINY_DIT)
  params16 = param_shapes(m16, z, t, y)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params16))
  params = random_params(m32, z, r, t, y, scale=0.1)
  v32, (v16, feats) = jax.jit(lambda p: (
      m32.apply({"params": p}, z, r, t, y),
      m16.apply({"params": p}, z, r, t, y, return_features=True)))(params)
  assert v16.dtype == jnp.float32 and feats[0].dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(v32)))
  assert scale > 0
  np.testing.assert_allclose(v16, v32, atol=5e-2 * scale)


def test_remat_same_outputs_and_grads():
  z, r, t, y = dit_inputs()
  plain = DiT(interval_conditioning=True, **TINY_DIT)
  remat = DiT(interval_conditioning=True, remat=True, **TINY_DIT)
  params = random_params(plain, z, r, t, y, scale=0.1)
  assert (jax.tree_util.tree_structure(param_shapes(remat, z, t, y))
          == jax.tree_util.tree_structure(params))

  def loss(model, p):
    return jnp.mean(jnp.square(model.apply({"params": p}, z, r, t, y)))

  (l0, g0), (l1, g1) = jax.jit(lambda p: (
      jax.value_and_grad(lambda q: loss(plain, q))(p),
      jax.value_and_grad(lambda q: loss(remat, q))(p)))(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         g1, g0)


# ----------------------------------------------------------------------------------------------
# Discriminator heads


def _features(batch=4, tokens=16, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((batch, tokens, 32)), jnp.float32),
          jnp.asarray(3.0 * rng.standard_normal((batch, tokens, 48)) + 1.0, jnp.float32)]


def _head_params(head, feats, query_scale=1.0):
  params = random_params(head, feats, scale=0.3)
  if "query" in params:
    params["query"] = query_scale * params["query"] / 0.3
  return params


def _apply_head(head):
  """jit of params, feats -> (logit, weights, token logits)."""
  def fn(p, feats):
    (logit, a), state = head.apply({"params": p}, feats, mutable=["intermediates"])
    return logit, a, state["intermediates"]["token_logits"][0]
  return jax.jit(fn)


def test_awd_head_shapes_and_weights():
  feats = _features()
  head = TokenDiscriminatorHead(pooling="awd", hidden=16, tau=1.0)
  # The query starts at zero: a new AWD head weights tokens uniformly (the baseline head).
  fresh = jax.jit(head.init)(jax.random.key(0, impl="rbg"), feats)["params"]
  np.testing.assert_array_equal(fresh["query"], 0.0)
  params = _head_params(head, feats, query_scale=5.0)
  logit, a, s = _apply_head(head)(params, feats)
  assert logit.shape == (4,) and logit.dtype == jnp.float32
  assert a.shape == (4, 16) and a.dtype == jnp.float32 and s.shape == (4, 16)
  np.testing.assert_allclose(jnp.sum(a, axis=-1), 1.0, rtol=1e-6)
  assert float(jnp.max(a)) > 2.0 / 16  # not uniform once the query has learned something
  np.testing.assert_allclose(logit, jnp.sum(a * s, axis=-1), rtol=1e-5, atol=1e-6)
  ent = token_weight_entropy(a)
  assert ent.shape == (4,) and bool(jnp.all(ent < math.log(16)))
  # One (B, N, D) array is accepted as a single layer.
  logit1, a1, _ = _apply_head(head)(_head_params(head, feats[0]), feats[0])
  assert logit1.shape == (4,) and a1.shape == (4, 16)


def test_mean_head_is_uniform_average():
  feats = _features()
  head = TokenDiscriminatorHead(pooling="mean", hidden=16)
  params = _head_params(head, feats)
  assert "query" not in params and "key" not in params
  logit, a, s = _apply_head(head)(params, feats)
  np.testing.assert_array_equal(a, np.full((4, 16), 1.0 / 16, np.float32))
  np.testing.assert_allclose(logit, jnp.mean(s, axis=-1), rtol=1e-5, atol=1e-6)


def test_awd_large_tau_tends_to_uniform():
  feats = _features()
  head = TokenDiscriminatorHead(pooling="awd", hidden=16)
  params = _head_params(head, feats, query_scale=5.0)

  @jax.jit
  def weights(p):
    return [head.clone(tau=tau).apply({"params": p}, feats)[1] for tau in (1.0, 100.0, 1e5)]

  spread = [float(jnp.max(jnp.abs(a - 1.0 / 16))) for a in weights(params)]
  assert spread[0] > spread[1] > spread[2] and spread[2] < 1e-5


def test_entropy_of_uniform_is_log_n():
  for n in (1, 7, 256):
    np.testing.assert_allclose(token_weight_entropy(jnp.full((3, n), 1.0 / n)), math.log(n),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(token_weight_entropy(jnp.array([[1.0, 0.0, 0.0]])), 0.0)


def test_awd_gradients_reach_query_and_key():
  feats = _features()
  head = TokenDiscriminatorHead(pooling="awd", hidden=16)
  grad_fn = jax.jit(jax.grad(lambda p: jnp.sum(head.apply({"params": p}, feats)[0])))
  # Even at the zero init the query gets a gradient (the key's comes once q != 0).
  grads = grad_fn(_head_params(head, feats, query_scale=0.0))
  assert float(jnp.max(jnp.abs(grads["query"]))) > 0
  grads = grad_fn(_head_params(head, feats))
  assert float(jnp.max(jnp.abs(grads["query"]))) > 0
  assert float(jnp.max(jnp.abs(grads["key"]["kernel"]))) > 0


def test_head_reads_dit_and_mlp_features():
  z, r, t, y = dit_inputs()
  model = DiT(feature_layers=(0, 1), **TINY_DIT)
  head = TokenDiscriminatorHead(hidden=16)

  @jax.jit
  def dit_logits(p, hp):
    _, feats = model.apply({"params": p}, z, r, t, y, return_features=True)
    return head.apply({"params": hp}, feats)

  feats = jax.eval_shape(lambda p: model.apply({"params": p}, z, r, t, y, return_features=True),
                         param_shapes(model, z, t, y))[1]
  logit, a = dit_logits(random_params(model, z, r, t, y), _head_params(head, feats))
  assert logit.shape == (3,) and a.shape == (3, 16)
  mlp = MLPFlow(**TINY_MLP)
  zm, rm, tm, ym = mlp_inputs()
  _, feats = jit_apply(mlp, return_features=True)(random_params(mlp, zm, rm, tm, ym),
                                                  zm, rm, tm, ym)
  logit, a = jax.jit(head.apply)({"params": _head_params(head, feats)}, feats)
  assert logit.shape == (5,)
  np.testing.assert_array_equal(a, 1.0)  # one token


# ----------------------------------------------------------------------------------------------
# Registry


def test_build_dit_and_mlp():
  cfg = ml_collections.ConfigDict(dict(
      name="dit", size="S/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES,
      hidden_size=32, depth=2, num_heads=4, dtype="bfloat16", interval_conditioning=True,
      feature_layers=[0, 1]))
  model = build(cfg)
  assert isinstance(model, DiT)
  assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (32, 2, 4, 2)
  assert model.dtype == jnp.bfloat16 and model.feature_layers == (0, 1)
  z, r, t, y = dit_inputs()
  params = param_shapes(model, z, t, y)
  assert "interval_embedder" in params
  out = jax.eval_shape(lambda p: model.apply({"params": p}, z, r, t, y), params)
  assert out.shape == z.shape and out.dtype == jnp.float32
  standard = build(dict(name="dit", size="DiT-B/4"))
  assert (standard.hidden_size, standard.depth, standard.patch_size) == (768, 12, 4)

  mlp = build(dict(name="mlp", width=16, depth=2, num_classes=3))
  assert isinstance(mlp, MLPFlow) and mlp.width == 16
  d = build_discriminator(ml_collections.ConfigDict(dict(pooling="mean", hidden=8, tau=0.5)))
  assert isinstance(d, TokenDiscriminatorHead) and d.pooling == "mean"


def test_build_errors_name_the_key():
  with pytest.raises(ValueError, match=r"config.name='unet'.*dit, mlp"):
    build(dict(name="unet"))
  with pytest.raises(ValueError, match="'hiden_size'"):
    build(dict(name="dit", size="S/2", hiden_size=3))
  with pytest.raises(ValueError, match="dtype='bf16'.*bfloat16"):
    build(dict(name="mlp", dtype="bf16"))
  with pytest.raises(ValueError, match="pooling='max'"):
    build_discriminator(dict(pooling="max"))
  assert isinstance(build(dict(name="mlp", lr=1.0), ignore=("lr",)), MLPFlow)
  assert set(models.__all__) >= {"DiT", "MLPFlow", "TokenDiscriminatorHead", "build",
                                 "build_discriminator", "dit_config", "init_student_from_teacher"}
