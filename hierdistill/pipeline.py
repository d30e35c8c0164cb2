"""Runs the configured chain of stages: teacher -> trajectory (stage 1) -> distribution (stage 2)
-> eval, each resumed from its own checkpoints and skipped when already finished.

Handoffs (checkpoint.py holds the resume order): stage 1 starts from the teacher's EMA params;
stage 2's generator from stage 1's final EMA params (or, for the DMD-only ablation, from the
teacher directly), its fake network from the teacher, its discriminator fresh. The teacher is read,
never re-saved.

Chain runs every experiment; what differs between data sets (their data, the kind of condition
and its null, input pipeline, grids, scorer) belongs to the data source of config.data.name
(sources/), which the chain uses through one interface and never by name.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import checkpoint as ckpt_lib
from hierdistill import conditions as cond_lib
from hierdistill import config_checks
from hierdistill import event_writer
from hierdistill import models as models_lib
from hierdistill import sharding as shard_lib
from hierdistill import sources
from hierdistill import workdir as workdir_lib
from hierdistill.config_checks import STAGE_ORDER, ConfigError, validate_config
from hierdistill.evaluation import driver
from hierdistill.models.student import student_of
from hierdistill.stages import common
from hierdistill.stages import loop
from hierdistill.stages import progress as progress_lib
from hierdistill.stages.distribution import DistributionStage
from hierdistill.stages.teacher import TeacherStage
from hierdistill.stages.trajectory import TrajectoryStage

# config.teacher.init_checkpoint with one of these endings is a published PyTorch file, imported
# by convert/ (SiT/DiT); anything else is a directory of exported params.
PUBLISHED_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_published_checkpoint(path) -> bool:
  """Whether `path` is a published PyTorch file rather than a directory of exported params."""
  return bool(path) and str(path).endswith(PUBLISHED_SUFFIXES)


class Networks:
  """The Flax modules of a run: teacher/fake network, student/generator, discriminator head."""

  def __init__(self, config, conditions=None):
    # The source's kind of condition (shapes for initialisation); class labels by default.
    self.conditions = conditions or cond_lib.Labels(config.model.num_classes)
    try:  # the registry raises ValueError only for what the config asks (a key, a size, a dtype)
      net = models_lib.build(config.model)
      self.discriminator = models_lib.build_discriminator(config.distribution.discriminator,
                                                          ignore=("features",))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    self.teacher = net.clone(interval_conditioning=False)
    # A velocity model whatever the teacher predicts (models/student.student_of).
    self.student = student_of(self.teacher)

  def abstract_params(self, shape, student: bool):
    """Shapes of the teacher's or the student's params, allocating nothing."""
    net = self.student if student else self.teacher
    # Abstract inputs too: concrete ones would compile (zeros, ones) before the checks are done.
    x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    c = self.conditions.abstract(1)
    return jax.eval_shape(
        lambda x, t, c: net.init(jax.random.PRNGKey(0), x, t if student else None, t, c)["params"],
        x, t, c)


def build_stage(name: str, config, nets: Networks):
  if name == "teacher":
    return TeacherStage(config, nets.teacher, nets.conditions)
  if name == "trajectory":
    return TrajectoryStage(config, nets.student, nets.teacher, nets.conditions)
  if name == "distribution":
    return DistributionStage(config, nets.student, nets.teacher, nets.discriminator,
                             nets.conditions)
  raise ValueError(f"unknown stage {name!r}; choose from {STAGE_ORDER}")


class Chain:
  """One run of the chain under a workdir: its mesh, data, networks and stage handoffs.

  devices: the devices to build the mesh over (default all); writer: a metric writer with
  clu's write_scalars/write_images/flush (default event_writer.EventWriter: TensorBoard under
  <workdir>/tensorboard); overwrite: move aside a
  run of a different config found in workdir instead of refusing to start.

  Everything a user can get wrong (config, devices, data, workdir, input checkpoints) is checked
  here, before anything compiles or is written, and raises ConfigError.

  The data source (self.source, sources/base.DataSource) supplies the training input, the
  condition kind, the grids and the eval scorer. The teacher comes from this run's teacher stage, or from config.teacher.init_checkpoint: a
  directory of exported params, or a published SiT/DiT file (PUBLISHED_SUFFIXES) imported by
  convert/ on first use (teacher_params, load_export).
  """

  def __init__(self, config, workdir: str, *, devices=None, writer=None, overwrite=False):
    validate_config(config)
    self.config = config
    self.progress = progress_lib.ChainProgress(config)
    self.workdir = workdir
    self.mesh = shard_lib.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    config_checks.check_batch_sizes(config, self.mesh.devices.size, jax.process_count())
    self.source = sources.open_source(config, workdir, self.mesh)
    self.source.check_model()
    self.nets = Networks(config, self.source.conditions)
    workdir_lib.check_writable(workdir)
    replace = workdir_lib.check_previous_run(config, workdir, overwrite)
    self._check_inputs(ignore_workdir=replace)
    if replace:
      workdir_lib.move_aside(workdir)
    self.grid = self.source.grid()
    workdir_lib.make_workdir(workdir)
    workdir_lib.write_config(config, workdir)
    self.writer = writer or _make_writer(workdir)
    self._teacher = None
    self._frozen_teacher = None  # teacher_params in config.frozen_param_dtype, once cast

  def _check_inputs(self, ignore_workdir: bool) -> None:
    """Each stage to run finds its inputs, and they fit the model (read from metadata only).

    Stages 1 and 2 need a teacher: this run's teacher stage (run now or finished in workdir) or
    config.teacher.init_checkpoint. Stage 2 starting fresh from stage 1 needs stage 1's export.
    """
    config, stages = self.config, tuple(self.config.stages)
    done = lambda s: (not ignore_workdir and ckpt_lib.is_finished(
        self.workdir, s, int(getattr(config, s).num_steps)))
    teacher_fix = ("set config.model to the teacher's architecture, or point "
                   "--config.teacher.init_checkpoint to a teacher of this model.")
    init_checkpoint = config.teacher.get("init_checkpoint")
    if is_published_checkpoint(init_checkpoint):
      # Its keys and shapes are checked when it is imported (convert/dit.py), on first use of
      # teacher_params: before any train step compiles.
      if not os.path.isfile(init_checkpoint):
        raise ConfigError(f"config.teacher.init_checkpoint={init_checkpoint!r}: no such file; "
                          "point it to a published SiT/DiT checkpoint, or to a directory of "
                          "exported params.")
      from hierdistill.convert import from_config  # pylint: disable=g-import-not-at-top
      from_config.check_teacher_model(config, self.nets.teacher)
    elif init_checkpoint:
      ckpt_lib.check_params_fit(
          init_checkpoint, self.exported_shapes("teacher")[0],
          what=f"config.teacher.init_checkpoint={init_checkpoint}", fix=teacher_fix)
    elif "teacher" in stages or ({"trajectory", "distribution"} & set(stages)):
      if done("teacher"):
        ckpt_lib.check_params_fit(
            self._export_dir("teacher"), self.exported_shapes("teacher")[0],
            what=f"the teacher checkpoint in {self.workdir}", fix=teacher_fix)
      elif "teacher" not in stages:
        needy = next(s for s in stages if s in ("trajectory", "distribution"))
        raise ConfigError(
            f"stage {needy!r} needs a teacher, but {self.workdir} has no finished teacher "
            "stage and config.teacher.init_checkpoint is empty; add 'teacher' to config.stages, "
            "or set --config.teacher.init_checkpoint=DIR (a directory of exported params).")
    fresh_from_stage1 = ("distribution" in stages and "trajectory" not in stages
                         and config.distribution.init_from == "trajectory"
                         and (ignore_workdir
                              or not ckpt_lib.saved_steps(self.workdir, "distribution")))
    if fresh_from_stage1:
      if not done("trajectory"):
        raise ConfigError(
            f"stage 'distribution' starts from stage 1's result, but {self.workdir} has no "
            "finished trajectory stage; add 'trajectory' to config.stages, or set "
            "--config.distribution.init_from=teacher (DMD without stage 1).")
      ckpt_lib.check_params_fit(
          self._export_dir("trajectory"), self.exported_shapes("trajectory")[0],
          what=f"the trajectory checkpoint in {self.workdir}",
          fix="set config.model to the architecture that run used.")

  def _export_dir(self, stage: str) -> str:
    return ckpt_lib.export_dir(self.workdir, stage, int(getattr(self.config, stage).num_steps))

  def exported_shapes(self, stage: str):
    """(abstract params, shardings) of what `stage` exports: its EMA params."""
    abstract = self.nets.abstract_params(self.source.shape, student=stage != "teacher")
    return abstract, shard_lib.state_shardings(abstract, self.mesh, self.config.sharding_rules)

  @property
  def imports_published_teacher(self) -> bool:
    return is_published_checkpoint(self.config.teacher.get("init_checkpoint"))

  def load_export(self, stage: str):
    """A finished stage's EMA params; the teacher's come from config.teacher.init_checkpoint
    when that is set (a published file is imported once, then kept: see teacher_params)."""
    init_checkpoint = self.config.teacher.get("init_checkpoint")
    if stage == "teacher" and init_checkpoint:
      if self.imports_published_teacher:
        return self.teacher_params
      return ckpt_lib.load_params(init_checkpoint, *self.exported_shapes("teacher"))
    return ckpt_lib.load_export(self.workdir, stage, *self.exported_shapes(stage))

  @property
  def teacher_params(self):
    """The frozen teacher, loaded (or imported) on first use."""
    if self._teacher is None:
      self._teacher = (self._import_teacher() if self.imports_published_teacher
                       else self.load_export("teacher"))
    return self._teacher

  @property
  def frozen_teacher(self):
    """The teacher as stages 1 and 2 read it, frozen: in config.frozen_param_dtype (the
    handoffs start the students and the fake network from teacher_params, full precision)."""
    dtype = self.config.get("frozen_param_dtype", "float32")
    if dtype == "float32":  # as stored: no copy
      return self.teacher_params
    if self._frozen_teacher is None:
      self._frozen_teacher = jax.jit(lambda p: common.frozen_copy(p, dtype))(self.teacher_params)
    return self._frozen_teacher

  def _import_teacher(self):
    """config.teacher.init_checkpoint, a published SiT/DiT file, as the teacher's params in
    the model's dtypes, placed with the current mesh's shardings."""
    from hierdistill.convert import from_config  # pylint: disable=g-import-not-at-top
    abstract, shardings = self.exported_shapes("teacher")
    params = from_config.load_teacher(self.config, self.nets.teacher)
    params = jax.tree.map(lambda a, s: np.asarray(a, s.dtype), params, abstract)
    return jax.device_put(params, shardings)

  def handoff(self, name: str, abstract: bool = False) -> dict:
    """What stage `name` starts from when it has no checkpoint of its own (or only shapes).

    teacher: nothing (scratch); trajectory: the teacher; distribution: a generator (stage 1's
    final EMA params, or the teacher as a student for the DMD-only ablation) and the teacher
    (the fake network's start).
    """
    if name == "teacher":
      return {}
    teacher = self.exported_shapes("teacher")[0] if abstract else self.teacher_params
    if name == "trajectory":
      return {"teacher": teacher}
    generator_shapes, generator_shardings = self.exported_shapes("trajectory")
    if abstract:
      generator = generator_shapes
    elif self.config.distribution.init_from == "teacher":
      generator = jax.jit(self._student_from_teacher,
                          out_shardings=generator_shardings)(teacher)
    else:
      generator = self.load_export("trajectory")
    return {"generator": generator, "teacher": teacher}

  def _student_from_teacher(self, teacher_params):
    x = jnp.zeros((1,) + self.source.shape, jnp.float32)
    t = jnp.ones((1,))
    c = jax.tree.map(jnp.asarray, self.nets.conditions.example(1))
    fresh = self.nets.student.init(jax.random.PRNGKey(0), x, t, t, c)
    return models_lib.init_student_from_teacher(fresh["params"], teacher_params)

  def run_stage(self, name: str) -> dict:
    """Trains one stage to its num_steps (resuming); a finished stage is skipped."""
    cfg = getattr(self.config, name)
    if ckpt_lib.is_finished(self.workdir, name, int(cfg.num_steps)) and self._export_ok(name):
      print(f"[{name}] finished earlier ({cfg.num_steps} steps): skipped", flush=True)
      return {"status": "finished earlier"}
    stage = build_stage(name, self.config, self.nets)
    rows = getattr(stage, "examples_per_row", 1)
    data = self.source.make_pipeline(cfg.batch_size * rows,
                                     self.config.seed * 1000 + stage.stage_id)
    frozen = {} if name == "teacher" else {"teacher": self.frozen_teacher}
    result = loop.run_stage(
        stage, config=self.config, workdir=self.workdir, mesh=self.mesh, pipeline=data,
        frozen=frozen, init_inputs=lambda abstract: self.handoff(name, abstract),
        grid=self.grid, writer=self.writer, save_grid=self.source.save_grid,
        progress=self.progress)
    return {"status": "trained", "steps_run": result.steps_run,
            "wall_time_s": round(result.wall_time_s, 1), "samples": result.samples_path,
            "final_metrics": result.final_metrics}

  def _export_ok(self, name: str) -> bool:
    """Whether a finished stage's export restores (the teacher's is kept: it is used next).

    A damaged final checkpoint is moved aside with a warning (checkpoint.py), and the stage
    then resumes from its newest good checkpoint instead of being skipped.
    """
    try:
      params = self.load_export(name)
    except ckpt_lib.CheckpointError as e:
      logging.warning("%s", e)
      return False
    if name == "teacher":
      self._teacher, self._frozen_teacher = params, None  # the copy is cast again on use
    return True

  def run(self) -> dict:
    """Runs config.stages in order; returns a summary of what was done and where."""
    t0 = time.time()
    summary: dict[str, Any] = {"workdir": os.path.abspath(self.workdir), "stages": {}}
    for name in self.config.stages:
      if name == "eval":
        summary["eval"] = driver.run_eval(self)
      else:
        summary["stages"][name] = self.run_stage(name)
    self.writer.flush()
    summary["wall_time_s"] = round(time.time() - t0, 1)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
      print(_format_summary(summary), flush=True)
    return summary


def run(config, workdir: str, **kwargs) -> dict:
  """Runs config.stages in order under `workdir` (see Chain)."""
  return Chain(config, workdir, **kwargs).run()


def _make_writer(workdir: str):
  """TensorBoard events from process 0 (event_writer.py: without TensorFlow, whose import
  was most of a launch's start-up time)."""
  if jax.process_index() > 0:
    return event_writer.NullWriter()
  return event_writer.EventWriter(os.path.join(workdir, "tensorboard"))


def _format_summary(summary: dict) -> str:
  lines = [f"\nhierdistill finished in {loop.format_duration(summary['wall_time_s'])}; "
           f"everything is under {summary['workdir']}"]
  for name, s in summary["stages"].items():
    extra = f", {s['wall_time_s']}s, samples: {s['samples']}" if s.get("samples") else ""
    lines.append(f"  {name:<13} {s['status']}{extra}")
  if "eval" in summary:
    lines.append(f"  eval          metrics: {summary['eval'].get('metrics_path')}")
  lines.append(f"  TensorBoard:  tensorboard --logdir {os.path.join(summary['workdir'], 'tensorboard')}")
  return "\n".join(lines)
