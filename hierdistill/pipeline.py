"""Runs the configured chain of stages: teacher -> trajectory (stage 1) -> distribution (stage 2)
-> eval, each resumed from its own checkpoints and skipped when already finished.

Handoffs (checkpoint.py holds the resume order): stage 1 starts from the teacher's EMA params;
stage 2's generator from stage 1's final EMA params (or, for the DMD-only ablation, from the
teacher directly), its fake network from the teacher, its discriminator fresh. The teacher is read,
never re-saved.

Chain runs every experiment; what differs between data sources is in four hooks (see Chain),
which imagenet_chain.ImageNetChain overrides for ImageNet latents. run() picks the class.
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
from hierdistill import config_checks
from hierdistill import models as models_lib
from hierdistill import sharding as shard_lib
from hierdistill import workdir as workdir_lib
from hierdistill.config_checks import STAGE_ORDER, ConfigError, validate_config
from hierdistill.stages import loop
from hierdistill.stages.distribution import DistributionStage
from hierdistill.stages.teacher import TeacherStage
from hierdistill.stages.trajectory import TrajectoryStage

GRID_SALT = 0x9E1D  # the grid's noise and labels are the same in every stage and every run
# config.teacher.init_checkpoint with one of these endings is a published PyTorch file, imported
# by convert/ (SiT/DiT); anything else is a directory of exported params.
PUBLISHED_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_published_checkpoint(path) -> bool:
  """Whether `path` is a published PyTorch file rather than a directory of exported params."""
  return bool(path) and str(path).endswith(PUBLISHED_SUFFIXES)


class Networks:
  """The Flax modules of a run: teacher/fake network, student/generator, discriminator head."""

  def __init__(self, config):
    try:  # the registry raises ValueError only for what the config asks (a key, a size, a dtype)
      net = models_lib.build(config.model)
      self.discriminator = models_lib.build_discriminator(config.distribution.discriminator,
                                                          ignore=("features",))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    self.teacher = net.clone(interval_conditioning=False)
    self.student = net.clone(interval_conditioning=True)

  def abstract_params(self, shape, student: bool):
    """Shapes of the teacher's or the student's params, allocating nothing."""
    net = self.student if student else self.teacher
    # Abstract inputs too: concrete ones would compile (zeros, ones) before the checks are done.
    x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(
        lambda x, t, y: net.init(jax.random.PRNGKey(0), x, t if student else None, t, y)["params"],
        x, t, y)


def build_stage(name: str, config, nets: Networks):
  if name == "teacher":
    return TeacherStage(config, nets.teacher)
  if name == "trajectory":
    return TrajectoryStage(config, nets.student, nets.teacher)
  if name == "distribution":
    return DistributionStage(config, nets.student, nets.teacher, nets.discriminator)
  raise ValueError(f"unknown stage {name!r}; choose from {STAGE_ORDER}")


def grid_inputs(config, data_shape) -> tuple[np.ndarray, np.ndarray]:
  """Fixed noise and labels for the sample grids: each row cycles through the classes."""
  n = int(config.sample.grid_size)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), GRID_SALT)
  noise = np.asarray(jax.random.normal(key, (n,) + tuple(data_shape)))
  labels = np.arange(n, dtype=np.int32) % config.model.num_classes
  return noise, labels


class Chain:
  """One run of the chain under a workdir: its mesh, data, networks and stage handoffs.

  devices: the devices to build the mesh over (default all); writer: a clu metric writer
  (default TensorBoard under <workdir>/tensorboard plus the console); overwrite: move aside a
  run of a different config found in workdir instead of refusing to start.

  Everything a user can get wrong (config, devices, data, workdir, input checkpoints) is checked
  here, before anything compiles or is written, and raises ConfigError.

  Hooks, for a data source that needs its own (imagenet_chain.ImageNetChain overrides each);
  run_stage and run call them and are written once, here:
    open_dataset()                          the training set, opened in __init__
    make_pipeline(global_batch_size, seed)  a stage's training input, batches by step
    save_grid(samples, path)                a PNG of samples (every stage's grid, eval's rows)
    run_eval()                              the 'eval' stage
  The teacher comes from this run's teacher stage, or from config.teacher.init_checkpoint: a
  directory of exported params, or a published SiT/DiT file (PUBLISHED_SUFFIXES) imported by
  convert/ on first use (teacher_params, load_export).
  """

  def __init__(self, config, workdir: str, *, devices=None, writer=None, overwrite=False):
    validate_config(config)
    self.config = config
    self.workdir = workdir
    self.mesh = shard_lib.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    config_checks.check_batch_sizes(config, self.mesh.devices.size, jax.process_count())
    self.dataset = self.open_dataset()
    config_checks.check_data_matches_model(self.dataset, config)
    self.nets = Networks(config)
    workdir_lib.check_writable(workdir)
    replace = workdir_lib.check_previous_run(config, workdir, overwrite)
    self._check_inputs(ignore_workdir=replace)
    if replace:
      workdir_lib.move_aside(workdir)
    self.grid = grid_inputs(config, self.dataset.shape)
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_config(config, workdir)
    self.writer = writer or _make_writer(workdir)
    self._teacher = None

  # -- hooks -----------------------------------------------------------------------------------

  def open_dataset(self):
    """The training set (config.data), read or opened once, before anything compiles.

    What is returned becomes self.dataset: it needs `name`, `num_classes` and `shape` (one
    example's), checked against config.model, plus whatever make_pipeline and save_grid read.
    Raises ConfigError when the data cannot be found. Default: the set in memory (`x`, `y`).
    """
    return load_train_set(self.config.data)

  def make_pipeline(self, global_batch_size: int, seed: int):
    """This process's training input of one stage: batch(step), iterate(start_step) and an
    `images` array whose shape[1:] is one example's (stages/loop.py). Its order depends only
    on (seed, step), so a resumed stage reads what an uninterrupted one would have."""
    from hierdistill import data as data_lib  # pylint: disable=g-import-not-at-top
    return data_lib.InMemoryPipeline(
        self.dataset.x, self.dataset.y, global_batch_size=global_batch_size, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  def save_grid(self, samples, path: str) -> None:
    """Images as a PNG grid; 2-D points as a scatter plot over the real data."""
    from hierdistill.evaluation import grids  # pylint: disable=g-import-not-at-top
    if len(self.dataset.shape) == 1:
      grids.scatter_png([self.dataset.x, samples], ["grey", "red"], path)
    else:
      grids.save_image_grid(samples, path)

  def run_eval(self) -> dict:
    """The 'eval' stage: stages/evaluate.py's rows, scored by its Evaluator (FD-digits,
    FD-points, ...). Returns what goes under 'eval' in the summary (metrics_path included)."""
    from hierdistill.stages import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.run_eval(self)

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
    abstract = self.nets.abstract_params(self.dataset.shape, student=stage != "teacher")
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
    x = jnp.zeros((1,) + self.dataset.shape, jnp.float32)
    t = jnp.ones((1,))
    fresh = self.nets.student.init(jax.random.PRNGKey(0), x, t, t, jnp.zeros((1,), jnp.int32))
    return models_lib.init_student_from_teacher(fresh["params"], teacher_params)

  def run_stage(self, name: str) -> dict:
    """Trains one stage to its num_steps (resuming); a finished stage is skipped."""
    cfg = getattr(self.config, name)
    if ckpt_lib.is_finished(self.workdir, name, int(cfg.num_steps)) and self._export_ok(name):
      print(f"[{name}] finished earlier ({cfg.num_steps} steps): skipped", flush=True)
      return {"status": "finished earlier"}
    stage = build_stage(name, self.config, self.nets)
    rows = getattr(stage, "examples_per_row", 1)
    data = self.make_pipeline(cfg.batch_size * rows, self.config.seed * 1000 + stage.stage_id)
    frozen = {} if name == "teacher" else {"teacher": self.teacher_params}
    result = loop.run_stage(
        stage, config=self.config, workdir=self.workdir, mesh=self.mesh, pipeline=data,
        frozen=frozen, init_inputs=lambda abstract: self.handoff(name, abstract),
        grid=self.grid, writer=self.writer, save_grid=self.save_grid)
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
      self._teacher = params
    return True

  def run(self) -> dict:
    """Runs config.stages in order; returns a summary of what was done and where."""
    t0 = time.time()
    summary: dict[str, Any] = {"workdir": os.path.abspath(self.workdir), "stages": {}}
    for name in self.config.stages:
      if name == "eval":
        summary["eval"] = self.run_eval()
      else:
        summary["stages"][name] = self.run_stage(name)
    self.writer.flush()
    summary["wall_time_s"] = round(time.time() - t0, 1)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
      print(_format_summary(summary), flush=True)
    return summary


def chain_class(config) -> type:
  """Chain, or the subclass whose hooks config.data needs."""
  if config.data.name == "imagenet256_latents":
    # ImageNet latents stream from shards, are decoded by the VAE and scored with Inception.
    from hierdistill import imagenet_chain  # pylint: disable=g-import-not-at-top
    return imagenet_chain.ImageNetChain
  return Chain


def run(config, workdir: str, **kwargs) -> dict:
  """Runs config.stages in order under `workdir` (see Chain)."""
  return chain_class(config)(config, workdir, **kwargs).run()


def data_dir_of(data_config) -> str:
  """The tfds data dir: config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return (data_config.data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.expanduser("~/tensorflow_datasets"))


def load_train_set(data_config):
  """The training split in memory; with data.unconditional, every label is 0 of 1 class."""
  from hierdistill import data as data_lib  # pylint: disable=g-import-not-at-top
  data_dir = data_dir_of(data_config)
  try:
    ds = data_lib.load_dataset(data_config.name, "train", data_dir=data_dir,
                               seed=data_config.seed)
  except (FileNotFoundError, PermissionError) as e:  # not built, not readable, not writable
    reason = e.strerror or str(e).split(";")[0]
    raise ConfigError(f"config.data.name={data_config.name!r} cannot be loaded from "
                      f"config.data.data_dir={data_dir!r}: {reason}; point --config.data.data_dir "
                      "to where it is, or to a writable directory.") from None
  if data_config.unconditional:
    ds = data_lib.ArrayDataset(ds.name, ds.x, np.zeros_like(ds.y), 1, ds.shape)
  return ds


def _make_writer(workdir: str):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(
      os.path.join(workdir, "tensorboard"), just_logging=jax.process_index() > 0,
      asynchronous=True)


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
