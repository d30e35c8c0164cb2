"""Scale: the mesh from the config, the FSDP partition rules over every stage's state, the batch
over both mesh axes, mixed precision (float32 storage, bfloat16 compute, the JVP's own dtype),
remat per block, and one compile per train step however many steps run.

Most checks trace or evaluate shapes only; the compile-count tests compile each stage's step
once, at LLVM -O0 (a few tiny steps, whose speed does not matter).
"""
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from experiments import digits
from hierdistill import pipeline
from hierdistill import sharding

STAGES = ("teacher", "trajectory", "distribution")
SHAPE = (8, 8, 1)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def config_of(dtype="float32", jvp_dtype="float32", remat=False, data=4, fsdp=2, rules=None):
  c = digits.get_config("tiny")
  c.model.update(dtype=dtype, remat=remat)
  c.trajectory.jvp_dtype = jvp_dtype
  c.mesh.update(data=data, fsdp=fsdp)
  if rules is not None:
    c.sharding_rules = rules
  return c


def abstract_stage(config, name):
  """(stage, abstract state, abstract frozen inputs) of a stage, allocating nothing."""
  nets = pipeline.Networks(config)
  stage = pipeline.build_stage(name, config, nets)
  teacher = nets.abstract_params(SHAPE, student=False)
  inputs = {"teacher": {}, "trajectory": {"teacher": teacher},
            "distribution": {"generator": nets.abstract_params(SHAPE, student=True),
                             "teacher": teacher}}[name]
  state = jax.eval_shape(
      lambda r, i: stage.init(r, jnp.zeros((1,) + SHAPE), jnp.zeros((1,), jnp.int32), i),
      jax.random.PRNGKey(0), inputs)
  frozen = {} if name == "teacher" else {"teacher": teacher}
  return stage, state, frozen


def abstract_batch(config, stage):
  rows = getattr(stage, "examples_per_row", 1)
  lead = (config.teacher.batch_size,) + ((rows,) if rows > 1 else ())
  return {"x": jax.ShapeDtypeStruct(lead + SHAPE, jnp.float32),
          "c": jax.ShapeDtypeStruct(lead, jnp.int32)}


def flat(tree):
  path_str = sharding._path_str  # pylint: disable=protected-access
  return {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ---- mesh and partition rules ----------------------------------------------------------------

@pytest.mark.parametrize("data,fsdp,n,expected", [
    (-1, 1, 1, (1, 1)), (1, -1, 1, (1, 1)), (4, 2, 8, (4, 2)), (-1, 8, 8, (1, 8)),
    (2, -1, 8, (2, 4)), (-1, 2, 8, (4, 2)),
    # With data=-1, fsdp is a cap: fewer devices shard over all of them (one config, host to pod).
    (-1, 64, 8, (1, 8)), (-1, 64, 1, (1, 1))])
def test_mesh_from_config(data, fsdp, n, expected):
  config = config_of(data=data, fsdp=fsdp)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=jax.devices()[:n])
  assert mesh.axis_names == ("data", "fsdp")
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == expected
  assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_mesh_that_does_not_cover_the_devices_names_the_key():
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh(3, 2, devices=jax.devices()[:8])
  # A capped fsdp that the slice's device count does not divide (64 on 96 chips) names the
  # nearest that does.
  with pytest.raises(ValueError, match=r"fsdp=64 does not divide the 96 devices.*"
                                       r"--config\.mesh\.fsdp=48"):
    sharding.mesh_shape(-1, 64, 96)
  with pytest.raises(ValueError, match="fsdp=3 does not divide the 8 devices.*fsdp=2"):
    sharding.make_mesh(-1, 3, devices=jax.devices()[:8])


@pytest.mark.parametrize("name", ["trajectory", "distribution"])
def test_rules_shard_params_and_optimiser_states_over_fsdp(name):
  """Every large leaf, its EMA and its Adam moments are split over 'fsdp' the same way, and a
  device holds about 1 / fsdp of the state."""
  config = config_of(data=2, fsdp=4)
  config.model.hidden_size = 64  # the tiny width leaves too little to shard
  mesh = sharding.make_mesh(2, 4, devices=jax.devices()[:8])
  _, state, _ = abstract_stage(config, name)
  shardings = sharding.state_shardings(state, mesh, config.sharding_rules)
  specs = {k: s.spec for k, s in flat(shardings).items()}
  leaves = flat(state)
  big = [k for k, v in leaves.items() if v.size >= 2 ** 12 and k.split("/")[0] == "params"]
  assert len(big) >= 8
  for path in big:
    assert "fsdp" in specs[path], path
    param = path[len("params/"):]
    # The EMA and both Adam moments of a parameter are laid out as the parameter.
    twins = [k for k in specs if k.endswith("/" + param) and k != path]
    assert len(twins) >= 3, (path, twins)
    assert all(specs[k] == specs[path] for k in twins), (path, twins)
  total = sum(v.size * v.dtype.itemsize for v in leaves.values())
  per_device = sharding.per_device_bytes(state, shardings)
  assert per_device < 0.35 * total, (per_device, total)


def test_an_fsdp_that_divides_no_width_is_measured_and_warned(caplog):
  """fsdp=8 divides no axis of a 36 x 1001 weight: it stays whole on every device, and the
  warning names the fix; a 64 x 64 weight beside it shards."""
  mesh = sharding.make_mesh(1, 8, devices=jax.devices()[:8])
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  odd = {"odd": f32(36, 1001), "bias": f32(1001)}
  even = {"even": f32(64, 64)}
  assert sharding.unshardable_fraction(odd, 8) == 1.0
  assert sharding.unshardable_fraction(even, 8) == 0.0
  assert sharding.unshardable_fraction({**odd, **even}, 8) == pytest.approx(
      36 * 1001 / (36 * 1001 + 64 * 64))
  # Leaves a rule replicates on purpose are not counted.
  assert sharding.unshardable_fraction(odd, 8, ((".*odd", "replicate"), (".*", "fsdp"))) == 0
  with caplog.at_level("WARNING"):
    sharding.state_shardings(even, mesh)
    assert "divides no axis" not in caplog.text
    sharding.state_shardings(odd, mesh)
  assert "config.mesh: fsdp=8 divides no axis of 100% of the weights' bytes" in caplog.text
  assert "--config.mesh.fsdp=64" in caplog.text


def test_replicate_rule_wins_over_a_later_fsdp_rule():
  config = config_of(data=2, fsdp=4, rules=((".*y_embedder.*", "replicate"), (".*", "fsdp")))
  config.model.hidden_size = 64
  mesh = sharding.make_mesh(2, 4, devices=jax.devices()[:8])
  _, state, _ = abstract_stage(config, "trajectory")
  specs = {k: s.spec for k, s in flat(sharding.state_shardings(
      state, mesh, config.sharding_rules)).items()}
  table = [k for k in specs if "y_embedder" in k]
  assert table and all(specs[k] == P() for k in table)
  assert any("fsdp" in s for k, s in specs.items() if "blocks_0" in k)


def test_batch_is_split_over_both_mesh_axes():
  mesh = sharding.make_mesh(4, 2, devices=jax.devices()[:8])
  local = {"x": np.arange(16 * 2, dtype=np.float32).reshape(16, 2),
           "c": np.arange(16, dtype=np.int32)}
  batch = sharding.put_batch(local, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  rows = sorted(int(s.data[0, 0]) // 2 for s in batch["x"].addressable_shards)
  assert rows == list(range(0, 16, 2))  # 8 devices, 2 rows each, every row once
  np.testing.assert_array_equal(np.asarray(batch["c"]), local["c"])
  with pytest.raises(ValueError, match="divisible"):
    sharding.check_batch_size(12, mesh, "config.teacher.batch_size")


# ---- mixed precision and remat ----------------------------------------------------------------

def dot_dtypes(jaxpr) -> dict:
  """{operand dtype: count} of every dot_general in a jaxpr and its sub-jaxprs; 'mixed' when
  the two operands differ (a float32 cotangent meeting bfloat16 activations in a backward pass,
  e.g. of the attention logits, which are float32 by design)."""
  counts = {}

  def visit(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "dot_general":
        a, b = (str(v.aval.dtype) for v in eqn.invars[:2])
        name = a if a == b else "mixed"
        counts[name] = counts.get(name, 0) + 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return counts


@pytest.mark.parametrize("name", STAGES)
def test_bfloat16_compute_keeps_float32_state_and_metrics(name):
  config = config_of(dtype="bfloat16")
  stage, state, frozen = abstract_stage(config, name)
  floats = [v for v in jax.tree.leaves(state) if jnp.issubdtype(v.dtype, jnp.floating)]
  assert floats and all(v.dtype == jnp.float32 for v in floats)
  batch = abstract_batch(config, stage)
  new_state, metrics = jax.eval_shape(stage.train_step, state, frozen, batch)
  # The step's output state has the input's exact avals: the next call cannot retrace.
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.weak_type), new_state) == jax.tree.map(
      lambda a: (a.shape, a.dtype, a.weak_type), state)
  assert all(m.dtype in (jnp.float32, jnp.int32) for m in jax.tree.leaves(metrics))
  dots = dot_dtypes(jax.make_jaxpr(stage.train_step)(state, frozen, batch))
  assert dots.get("bfloat16", 0) > 0, dots


@pytest.mark.parametrize("jvp_dtype", ["float32", "bfloat16"])
def test_stage1_jvp_runs_in_its_configured_dtype(jvp_dtype):
  """Default float32: the student's JVP (and so its backward) is float32 while the teacher runs
  in bfloat16. As an option the JVP runs in bfloat16 too: no float32 matmul is left."""
  config = config_of(dtype="bfloat16", jvp_dtype=jvp_dtype)
  stage, state, frozen = abstract_stage(config, "trajectory")
  dots = dot_dtypes(jax.make_jaxpr(stage.train_step)(state, frozen,
                                                      abstract_batch(config, stage)))
  assert dots.get("bfloat16", 0) > 0, dots
  if jvp_dtype == "float32":
    assert dots.get("float32", 0) > 0, dots
  else:
    assert dots.get("float32", 0) == 0, dots


@pytest.mark.parametrize("remat", [False, True])
def test_remat_wraps_each_block(remat):
  config = config_of(remat=remat)
  nets = pipeline.Networks(config)
  params = nets.abstract_params(SHAPE, student=True)
  x = jnp.zeros((2,) + SHAPE)
  t = jnp.ones((2,))
  fwd = lambda p: nets.student.apply({"params": p}, x, t, t, jnp.zeros((2,), jnp.int32))
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(fwd(p))))(params)
  names = []

  def visit(j):
    for eqn in j.eqns:
      names.append(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  remats = sum(n in ("checkpoint", "remat", "remat2") for n in names)
  assert remats == (config.model.depth if remat else 0), sorted(set(names))


# ---- one compile per train step ------------------------------------------------------------------

class CompileCounter:
  """Counts XLA compilations (jax's backend-compile events) while active."""

  def __init__(self):
    self.names = []

  def __call__(self, event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      self.names.append(kwargs.get("fun_name", "?"))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


@pytest.mark.parametrize("name", [
    "teacher", "trajectory",
    # Stage 2's step compiles for about a minute even at -O0 (three networks, a scan).
    pytest.param("distribution", marks=pytest.mark.slow)])
def test_train_step_compiles_once(name):
  """bfloat16 compute, remat, a (4, 2) mesh, the step jitted as the loop jits it: three steps,
  one trace and one compile of the step; later steps compile nothing at all."""
  config = config_of(dtype="bfloat16", remat=True)
  mesh = sharding.make_mesh(4, 2, devices=jax.devices()[:8])
  stage, abstract, frozen_abstract = abstract_stage(config, name)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  nets = pipeline.Networks(config)
  teacher = jax.jit(lambda r: nets.teacher.init(
      r, jnp.zeros((1,) + SHAPE), None, jnp.ones((1,)), jnp.zeros((1,), jnp.int32))["params"],
      out_shardings=sharding.state_shardings(frozen_abstract.get("teacher", {}), mesh))(
          jax.random.PRNGKey(1)) if frozen_abstract else None
  inputs = {"teacher": {}, "trajectory": {"teacher": teacher},
            "distribution": {"generator": None, "teacher": teacher}}[name]
  if name == "distribution":
    inputs["generator"] = jax.jit(
        lambda r: nets.student.init(r, jnp.zeros((1,) + SHAPE), jnp.ones((1,)), jnp.ones((1,)),
                                    jnp.zeros((1,), jnp.int32))["params"],
        out_shardings=sharding.state_shardings(
            nets.abstract_params(SHAPE, student=True), mesh))(jax.random.PRNGKey(2))
  frozen = {"teacher": teacher} if teacher is not None else {}
  state = jax.jit(lambda r, i: stage.init(r, jnp.zeros((1,) + SHAPE),
                                          jnp.zeros((1,), jnp.int32), i),
                  out_shardings=shardings)(jax.random.PRNGKey(0), inputs)
  traces = []

  def counted_step(state, frozen, batch):
    traces.append(1)  # runs only while tracing
    return stage.train_step(state, frozen, batch)

  jitted = jax.jit(counted_step,
                   in_shardings=(shardings, jax.tree.map(lambda a: a.sharding, frozen),
                                 sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,),
                   compiler_options=FAST_COMPILE)
  step = sharding.under_mesh(jitted, mesh)  # as the loop calls it: traced under the mesh
  spec = abstract_batch(config, stage)
  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=spec["x"].shape).astype(np.float32),
              "c": rng.integers(0, 10, size=spec["c"].shape).astype(np.int32)}
             for _ in range(3)]
  state, metrics = step(state, frozen, sharding.put_batch(batches[0], mesh))
  jax.block_until_ready(metrics)
  with CompileCounter() as later:
    for b in batches[1:]:
      state, metrics = step(state, frozen, sharding.put_batch(b, mesh))
    metrics = jax.device_get(metrics)
  assert len(traces) == 1
  assert jitted._cache_size() == 1  # pylint: disable=protected-access
  assert later.names == [], later.names
  assert int(state.step) == 3
  assert np.isfinite(metrics["loss"])


# ---- FSDP gathers weights, not activations -------------------------------------------------------

def activation_gathers(compiled, batch: int) -> list:
  """Shapes of the floating-point all-gathers in a compiled program whose leading axis is the
  global batch.

  Integer gathers are left out: with the label table split over 'fsdp' along its columns, XLA
  gathers the batch's labels (B int32s) so that each device looks up its columns, which costs
  less than gathering the table; labels are data, not activations.
  """
  import re  # pylint: disable=g-import-not-at-top
  # The result types of each all-gather: one shape, or a tuple of them for a combined gather.
  results = re.findall(r"= ([^=\n]*?) all-gather(?:-start)?\(", compiled.as_text())
  shapes = [m for r in results for m in re.findall(r"(\w+)\[([\d,]*)\]", r)]
  return [f"{t}[{s}]" for t, s in shapes
          if t.startswith(("f", "bf")) and s.split(",")[0] == str(batch) and "," in s]


class _Mlp:
  """Two Dense layers over (B, N, D) tokens, optionally with batch-pinned outputs."""

  def __init__(self, dot_general=None):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    kw = {"dot_general": dot_general} if dot_general else {}

    class Mlp(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(384, **kw)(nn.gelu(nn.Dense(1536, **kw)(x)))

    self.module = Mlp()


@pytest.mark.parametrize("pinned", [False, True])
def test_batch_pinned_dots_make_fsdp_gather_weights(pinned):
  """The shape of the problem the DiT has, in two layers: (64, 16, 384) tokens through
  384 -> 1536 -> 384 under (1, 8) FSDP. Left alone XLA gathers the activations; with
  sharding.batch_sharded_dot_general it gathers only the weights."""
  mesh = sharding.make_mesh(1, 8, devices=jax.devices()[:8])
  mlp = _Mlp(sharding.batch_sharded_dot_general(mesh) if pinned else None).module
  x = jax.ShapeDtypeStruct((64, 16, 384), jnp.float32)
  params = jax.eval_shape(lambda: mlp.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 384))))
  shardings = sharding.state_shardings(params, mesh)
  loss = lambda p, x: jnp.mean(jnp.square(mlp.apply(p, x)))
  compiled = jax.jit(jax.grad(loss), in_shardings=(shardings, sharding.batch_sharding(mesh)),
                     out_shardings=shardings, compiler_options=FAST_COMPILE).lower(
                         params, x).compile()
  gathers = activation_gathers(compiled, 64)
  if pinned:
    assert gathers == [], gathers
  else:
    assert gathers, "XLA no longer gathers activations here: the DiT test below may pass too"


def test_constrain_batch_is_a_no_op_outside_a_mesh():
  x = jnp.ones((4, 3))
  assert sharding.constrain_batch(x) is x


@pytest.mark.parametrize("student", [False, True])
def test_dit_under_a_mesh_computes_what_it_computes_alone(student):
  """The batch pins change the layout, never the numbers: a tiny DiT's velocity and features on
  a (4, 2) FSDP mesh, traced under it, equal the single-device ones."""
  config = config_of(data=4, fsdp=2)
  config.model.hidden_size = 64  # wide enough for the rules to shard its kernels
  nets = pipeline.Networks(config)
  net = nets.student if student else nets.teacher
  mesh = sharding.make_mesh(4, 2, devices=jax.devices()[:8])
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(16,) + SHAPE), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(16,)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=(16,)), jnp.int32)
  params = net.init(jax.random.PRNGKey(0), z[:1], t[:1], t[:1], y[:1])["params"]
  # Non-zero adaLN and output layers, so that every block changes the result.
  params = jax.tree.map(lambda p: p + 0.02 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                        params)
  fwd = lambda p, z, t, y: net.apply({"params": p}, z, t * 0.5, t, y, return_features=True)
  alone = jax.jit(fwd)(params, z, t, y)
  shardings = sharding.state_shardings(params, mesh, config.sharding_rules)
  assert any("fsdp" in s.spec for s in jax.tree.leaves(shardings))
  batch = sharding.batch_sharding(mesh)
  jaxpr = sharding.under_mesh(lambda: jax.make_jaxpr(fwd)(params, z, t, y), mesh)()
  assert "sharding_constraint" in str(jaxpr)
  meshed = sharding.under_mesh(jax.jit(fwd, in_shardings=(shardings, batch, batch, batch)),
                               mesh)(jax.device_put(params, shardings),
                                     *jax.device_put((z, t, y), batch))
  assert meshed[0].sharding.spec[0] == ("data", "fsdp")
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(meshed)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp_train_step_gathers_no_activations():
  """The flow-matching step of a DiT-S/2 block on 8x8x4 latents, batch 64, (1, 8) FSDP, traced
  under the mesh as the training loop traces it: the DiT's dots pin their outputs to the batch
  layout, so XLA gathers weights only."""
  from experiments.common import base_config  # pylint: disable=g-import-not-at-top
  from hierdistill.models import dit_config  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.model.update(dit_config("S/2"), depth=1, input_size=8, in_channels=4, num_classes=1000,
                 feature_layers=(0,))
  c.teacher.batch_size = 64
  mesh = sharding.make_mesh(1, 8, devices=jax.devices()[:8])
  stage = pipeline.build_stage("teacher", c, pipeline.Networks(c))
  shape = (8, 8, 4)
  state = jax.eval_shape(lambda r: stage.init(r, jnp.zeros((1,) + shape),
                                              jnp.zeros((1,), jnp.int32)),
                         jax.random.PRNGKey(0))
  batch = {"x": jax.ShapeDtypeStruct((64,) + shape, jnp.float32),
           "c": jax.ShapeDtypeStruct((64,), jnp.int32)}
  shardings = sharding.state_shardings(state, mesh, c.sharding_rules)
  step = jax.jit(
      stage.train_step,
      in_shardings=(shardings, {}, jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,),
      compiler_options=FAST_COMPILE)
  compiled = sharding.under_mesh(lambda: step.lower(state, {}, batch).compile(), mesh)()
  assert activation_gathers(compiled, 64) == []


def test_constrain_batch_leaves_an_indivisible_batch_alone():
  mesh = sharding.make_mesh(4, 2, devices=jax.devices()[:8])
  out = jax.jit(lambda x: sharding.constrain_batch(x, mesh) * 2)(jnp.ones((3, 5)))
  np.testing.assert_array_equal(np.asarray(out), 2 * np.ones((3, 5)))
  out = jax.jit(lambda x: sharding.constrain_batch(x, mesh))(jnp.ones((16, 5)))
  assert out.sharding.spec[0] == ("data", "fsdp")


@pytest.mark.parametrize("pairing", ["interleaved", "concatenated"])
def test_cfg_pairs_rows_without_moving_the_batch(pairing):
  """CFG's conditional and unconditional passes share one batch of 2B rows. Interleaved
  (paths.pair_rows) each row's pair stays on its device; concatenated, XLA gathers the batch."""
  from hierdistill import paths  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(1, 8)
  b = 64
  model = lambda z, t, y: z * (t + y)[:, None, None, None]  # row-wise, like a network

  def guided(z, t, y):
    if pairing == "interleaved":
      return paths.cfg_velocity(model, z, t, y, w=2.0, null=10)
    v_both = model(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                   jnp.concatenate([y, jnp.full_like(y, 10)]))
    return paths.guided_velocity(v_both[:b], v_both[b:], 2.0)

  row = sharding.batch_sharding(mesh)
  args = (jax.ShapeDtypeStruct((b, 8, 8, 4), jnp.float32, sharding=row),
          jax.ShapeDtypeStruct((b,), jnp.float32, sharding=row),
          jax.ShapeDtypeStruct((b,), jnp.int32, sharding=row))
  hlo = jax.jit(guided, out_shardings=row).lower(*args).compile().as_text()
  moves = set(re.findall(r"\b(all-gather|all-to-all|collective-permute|all-reduce)\b", hlo))
  if pairing == "interleaved":
    assert not moves, moves  # every device works on its own rows only
  else:
    assert moves  # the traffic the pairing avoids; should XLA stop needing it, drop this case
