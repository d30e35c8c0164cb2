"""The memory levers a TPU user pulls to fit a slice change memory and time, never the numbers:
gradient accumulation (<stage>.microbatches), the remat policy (model.remat_policy), the frozen
teacher held in bfloat16 (frozen_param_dtype, to bfloat16's precision) and the optimiser state
in host memory (<stage>.offload_optimizer_state, bitwise). Each is checked on one step of every
stage of the tiny digits config against the step without it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits, digits_text
from hierdistill import pipeline
from hierdistill import sources
from hierdistill.config_checks import ConfigError, validate_config
from hierdistill.stages import common

STAGES = ("teacher", "trajectory", "distribution")
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SHAPE = (8, 8, 1)


def perturb(params, key):
  """params plus N(0, 0.05^2) noise on every leaf: the zero-initialised output layers would
  otherwise make u = 0 (every loss 0, every path alike)."""
  keys = jax.tree.unflatten(jax.tree.structure(params),
                            list(jax.random.split(key, len(jax.tree.leaves(params)))))
  return jax.tree.map(lambda a, k: a + 0.05 * jax.random.normal(k, a.shape, a.dtype), params,
                      keys)


def one_step(config, name, frozen_dtype="float32", *, init_config=None, convert=None):
  """(metrics, new state) of one train step of stage `name` from fixed, non-trivial params
  (random, then perturbed: the zero-initialised output layers would make every loss 0).
  init_config: the config whose networks and stage draw the params and the initial state
  (default `config`); convert: maps that state and the teacher's params to `config`'s
  networks (a change of layout)."""
  kind = sources.source_class(config.data.name).condition_kind(config)
  nets = pipeline.Networks(config, kind)
  init_nets = nets if init_config is None else pipeline.Networks(init_config, kind)
  c1 = jax.tree.map(jnp.asarray, nets.conditions.example(1))
  x1, t1 = jnp.zeros((1,) + SHAPE), jnp.ones((1,))
  teacher = perturb(init_nets.teacher.init(jax.random.PRNGKey(0), x1, None, t1, c1)["params"],
                    jax.random.PRNGKey(1))
  student = perturb(init_nets.student.init(jax.random.PRNGKey(2), x1, t1, t1, c1)["params"],
                    jax.random.PRNGKey(3))
  stage = pipeline.build_stage(name, config, nets)
  init_stage = stage if init_config is None else pipeline.build_stage(name, init_config,
                                                                      init_nets)
  inputs = {"teacher": {}, "trajectory": {"teacher": teacher},
            "distribution": {"generator": student, "teacher": teacher}}[name]
  state = init_stage.init(jax.random.PRNGKey(4), x1, c1,
                          *([inputs] if name != "teacher" else []))
  if convert is not None:
    state, teacher = convert(state), convert(teacher)
  rows = getattr(stage, "examples_per_row", 1)
  b = getattr(config, name).batch_size
  lead = (b, rows) if rows > 1 else (b,)
  x = jax.random.normal(jax.random.PRNGKey(5), lead + SHAPE)
  c = jax.tree.map(lambda a: jnp.broadcast_to(a[0], lead + a.shape[1:]), c1)
  if not config.model.get("caption_channels", 0):
    c = jax.random.randint(jax.random.PRNGKey(6), lead, 0, 10)
  frozen = {} if name == "teacher" else {"teacher": common.frozen_copy(teacher, frozen_dtype)}
  step = jax.jit(stage.train_step, compiler_options=FAST_COMPILE)
  new_state, metrics = step(state, frozen, {"x": x, "c": c})
  return jax.device_get(metrics), jax.device_get(new_state)


def tiny(**model):
  c = digits.get_config("tiny")
  c.mesh.update(data=-1, fsdp=1)
  for s in STAGES:
    getattr(c, s).batch_size = 16
  c.model.update(**model)
  return c


COMPARED = ("loss", "grad_norm", "critic_loss", "fake_grad_norm", "disc_grad_norm")


def assert_same_step(a, b, rtol, atol):
  (ma, sa), (mb, sb) = a, b
  for key in COMPARED:
    if key in ma:
      np.testing.assert_allclose(mb[key], ma[key], rtol=rtol, atol=atol, err_msg=key)
  for la, lb in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_allclose(np.asarray(lb, np.float64), np.asarray(la, np.float64),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", STAGES)
def test_gradient_accumulation_gives_the_same_update(name):
  # Labels are dropped inside the network, per micro-batch (same rate, other draws): 0 here.
  config = tiny(class_dropout_prob=0.0)
  plain = one_step(config, name)
  assert plain[0]["loss"] > 0
  getattr(config, name).microbatches = 4
  accumulated = one_step(config, name)
  assert_same_step(plain, accumulated, rtol=2e-5, atol=1e-6)


def test_gradient_accumulation_keeps_caption_dropout():
  """Captions are dropped for the whole batch before it is sliced: the same update with
  dropout on."""
  config = digits_text.get_config("tiny")
  config.mesh.update(data=-1, fsdp=1)
  config.teacher.batch_size = 16
  assert config.model.class_dropout_prob > 0
  plain = one_step(config, "teacher")
  config.teacher.microbatches = 2
  assert_same_step(plain, one_step(config, "teacher"), rtol=2e-5, atol=1e-6)


def test_microbatches_must_divide_the_batch():
  config = tiny()
  config.trajectory.microbatches = 3
  with pytest.raises(ConfigError, match="trajectory.microbatches=3"):
    validate_config(config)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable", "everything_saveable"])
@pytest.mark.parametrize("name", ["trajectory", "distribution"])
def test_remat_policy_changes_no_number(name, policy):
  plain = one_step(tiny(remat=False), name)
  remat = one_step(tiny(remat=True, remat_policy=policy), name)
  assert_same_step(plain, remat, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["trajectory", "distribution"])
def test_bfloat16_frozen_teacher_moves_a_bfloat16_model_by_rounding_only(name):
  """With bfloat16 compute the matmuls read bfloat16 weights either way; what changes is the
  float32 work (time embedding, norms) on rounded weights: bfloat16's precision, no more."""
  config = tiny(dtype="bfloat16")
  full = one_step(config, name)
  half = one_step(config, name, frozen_dtype="bfloat16")
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(half[0][key], full[0][key], rtol=2e-2, err_msg=key)
  held = common.frozen_copy({"w": jnp.ones(3), "i": jnp.ones(3, jnp.int32)}, "bfloat16")
  assert held["w"].dtype == jnp.bfloat16 and held["i"].dtype == jnp.int32


@pytest.mark.parametrize("name", STAGES)
def test_optimizer_state_on_the_host_gives_the_same_update(name):
  config = tiny()
  plain = one_step(config, name)
  getattr(config, name).offload_optimizer_state = True
  offloaded = one_step(config, name)
  assert_same_step(plain, offloaded, rtol=0, atol=0)
