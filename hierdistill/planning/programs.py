"""Every program a run executes, as abstract arguments laid out on a mesh: the train step of
each configured stage (the teacher's flow matching, stage 1, stage 2 with its k critic updates),
the samplers of the grids and the evaluation (the teacher's N-step ODE with CFG, the
generator's one step), and the frozen text encoder where the data source runs one on a chip
(SANA's Gemma-2, at extraction and for the eval's prompts). Shapes only: nothing is allocated,
so a 1.6B-parameter run is laid out on a laptop.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import conditions as cond_lib
from hierdistill import pipeline
from hierdistill import sharding
from hierdistill import sources
from hierdistill.config_checks import TRAINING_STAGES, ConfigError
from hierdistill.stages import common
from hierdistill.text import sana_encoder

SAMPLERS = ("sampler", "generator")
ENCODER = "encoder"
PROGRAMS = TRAINING_STAGES + SAMPLERS + (ENCODER,)


@dataclasses.dataclass
class Program:
  """One jitted program of a run: fn(*args), laid out by in_shardings / out_shardings."""
  name: str
  what: str  # a line for the reader: what it computes, at which batch
  fn: Callable
  args: tuple  # ShapeDtypeStructs
  in_shardings: tuple
  out_shardings: Any
  donate: tuple
  # Bytes a device holds of each input, from shapes and shardings (the partition rules' plan).
  params_bytes: int = 0
  optim_bytes: int = 0
  batch_bytes: int = 0
  optim_on_host: bool = False  # the optimiser state lives in host memory (offload_optimizer_state)
  mesh: Any = None  # the devices it runs on, where not the run's mesh (the encoder: one chip)


def encodes_text(config) -> bool:
  """Whether the run's conditions come from a large frozen text encoder (config.text_encoder)."""
  return "text_encoder" in config and int(config.model.get("caption_channels", 0)) > 0


def condition_kind(config):
  """The run's kind of condition, from the config alone (no data, no text encoder read).

  A text source encoded by a large frozen encoder (config.text_encoder) is laid out from the
  encoder's output shape: max_sequence_length tokens of model.caption_channels."""
  if encodes_text(config):
    length = int(config.text_encoder.max_sequence_length)
    null = np.zeros((length, int(config.model.caption_channels)), np.float32)
    return cond_lib.Text(null, np.eye(1, length, dtype=np.int32)[0])
  return sources.source_class(config.data.name).condition_kind(config)


def example_shape(config) -> tuple:
  return tuple(sources.source_class(config.data.name).example_shape(config))


def default_programs(config) -> tuple:
  """The programs the configured chain runs: its training stages, then the samplers (the
  teacher's sampler draws the grids and the eval's teacher rows; the generator its own), then
  the text encoder where there is one."""
  return (tuple(s for s in config.stages if s in TRAINING_STAGES) + SAMPLERS
          + ((ENCODER,) if encodes_text(config) else ()))


def build(config, mesh, names) -> list:
  """The Programs `names` (of PROGRAMS) of the run `config` on `mesh`."""
  conditions = condition_kind(config)
  nets = pipeline.Networks(config, conditions)
  shape = example_shape(config)
  out = []
  for name in names:
    if name in TRAINING_STAGES:
      out.append(_train_step(config, mesh, nets, shape, name))
    elif name in SAMPLERS:
      out.append(_sampler(config, mesh, nets, shape, name))
    elif name == ENCODER:
      out.append(_text_encoder(config, mesh))
    else:
      raise ValueError(f"unknown program {name!r}; choose from {PROGRAMS}.")
  return out


def _batch(lead, shape, conditions):
  return {"x": jax.ShapeDtypeStruct(tuple(lead) + tuple(shape), jnp.float32),
          "c": jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(lead) + a.shape[1:], a.dtype),
                            conditions.abstract(1))}


def _train_step(config, mesh, nets, shape, name) -> Program:
  stage = pipeline.build_stage(name, config, nets)
  rows = getattr(stage, "examples_per_row", 1)
  cfg = getattr(config, name)
  teacher = nets.abstract_params(shape, student=False)
  inputs = {"teacher": {}, "trajectory": {"teacher": teacher},
            "distribution": {"generator": nets.abstract_params(shape, student=True),
                             "teacher": teacher}}[name]
  state = jax.eval_shape(
      lambda r, i: stage.init(r, jnp.zeros((1,) + shape), nets.conditions.example(1),
                              *([i] if name != "teacher" else [])),
      jax.ShapeDtypeStruct((2,), jnp.uint32), inputs)
  frozen = {} if name == "teacher" else {
      "teacher": common.frozen_copy(teacher, config.get("frozen_param_dtype", "float32"))}
  b = int(cfg.batch_size)
  batch = _batch((b, rows) if rows > 1 else (b,), shape, nets.conditions)
  rules = config.sharding_rules
  state_sh = sharding.train_state_shardings(state, mesh, rules,
                                            optimizer_state_on_host=common.offloads(cfg))
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)
  fields = vars(state)
  weights = {k: v for k, v in fields.items() if k.endswith("params")}
  optim = {k: v for k, v in fields.items() if k.endswith("opt_state")}
  pick = lambda tree: {k: getattr(state_sh, k) for k in tree}
  micro = int(cfg.get("microbatches", 1))
  what = (f"{name} train step, global batch {b}"
          + (f" x {rows} minibatches (k = {rows - 1} critic updates + 1)" if rows > 1 else "")
          + (f", {micro} micro-batches" if micro > 1 else ""))
  return Program(
      name=name, what=what, fn=stage.train_step, args=(state, frozen, batch),
      in_shardings=(state_sh, frozen_sh, batch_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate=(0,),
      params_bytes=(sharding.per_device_bytes(weights, pick(weights))
                    + sharding.per_device_bytes(frozen, frozen_sh)),
      optim_bytes=sharding.per_device_bytes(optim, pick(optim)),
      batch_bytes=sharding.per_device_bytes(batch, batch_sh),
      optim_on_host=common.offloads(cfg))


def _sampler(config, mesh, nets, shape, name) -> Program:
  """The teacher's sampler (config.sample: solver, steps, CFG) or the generator's one step, at
  the evaluation batch (padded to the devices, as the eval pads it)."""
  b = sharding.padded_batch_size(int(config.eval.batch_size), mesh)
  student = name == "generator"
  params = nets.abstract_params(shape, student=student)
  if student:
    stage = pipeline.build_stage("trajectory", config, nets)
    fn = lambda p, noise, c: stage.sample(p, noise, c, num_steps=1)
    what = f"generator, one step x = e - u(e, 0, 1 | c), batch {b}"
  else:
    stage = pipeline.build_stage("teacher", config, nets)
    steps = int(config.sample.teacher_steps)
    fn = lambda p, noise, c: stage.sample(p, noise, c, num_steps=steps)
    what = (f"teacher sampler, {steps} {config.sample.teacher_method} steps, CFG "
            f"{config.sample.cfg_scale:g}, batch {b}")
  batch = _batch((b,), shape, nets.conditions)
  params_sh = sharding.state_shardings(params, mesh, config.sharding_rules)
  batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)
  return Program(
      name=name, what=what, fn=fn, args=(params, batch["x"], batch["c"]),
      in_shardings=(params_sh, batch_sh["x"], batch_sh["c"]),
      out_shardings=sharding.batch_sharding(mesh), donate=(),
      params_bytes=sharding.per_device_bytes(params, params_sh),
      batch_bytes=sharding.per_device_bytes(batch, batch_sh))


def _text_encoder(config, mesh) -> Program:
  """The frozen text encoder on one chip, as extraction and the eval run it (a jit of
  sana_encoder.encode_fn, params whole on the host's first device), at the larger of the
  extraction and eval batches, or in chunks of config.text_encoder.batch_size."""
  if not encodes_text(config):
    raise ConfigError(f"--programs={ENCODER}: {config.name} has no frozen text encoder "
                      "(config.text_encoder); plan its other programs.")
  module, length, exact = sources.source_class(config.data.name).abstract_text_encoder(config)
  b = max(int(config.data.get("extract_batch_size", 1)), int(config.eval.batch_size))
  b = min(b, int(config.text_encoder.get("batch_size", 0)) or b)  # encoded in chunks of it
  chip = jax.sharding.Mesh(np.asarray(mesh.devices).reshape(-1)[:1].reshape(1, 1),
                           mesh.axis_names)
  ids = jax.ShapeDtypeStruct((b, length), jnp.int32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  params = jax.eval_shape(module.init, key, ids, ids)["params"]
  whole = sharding.replicated(chip)
  params_sh = jax.tree.map(lambda _: whole, params)
  n = int(config.text_encoder.max_sequence_length)
  what = (f"text encoder ({module.num_layers} layers, width {module.hidden_size}) on one chip, "
          f"batch {b} x {length} tokens{'' if exact else ' (at most: no tokenizer file read)'}"
          f" -> {n}")
  return Program(
      name=ENCODER, what=what, fn=sana_encoder.encode_fn(module, n), args=(params, ids, ids),
      in_shardings=(params_sh, whole, whole), out_shardings=whole, donate=(),
      params_bytes=sharding.per_device_bytes(params, params_sh),
      batch_bytes=2 * b * length * 4, mesh=chip)  # ids and mask, int32
