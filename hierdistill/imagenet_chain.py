"""The chain on ImageNet latents: pipeline.Chain with the ImageNet data source, the imported
teacher, VAE-decoded sample grids and the Inception evaluation.

What differs from the embedded experiments, and where it plugs in:
  __init__       check every file the run will read (convert/from_config.py), before anything
                 compiles; open the latents (runlocal: extract mock ImageNet first)
  teacher_params the imported SiT/DiT checkpoint (config.teacher.checkpoint) when the chain
                 has no teacher stage of its own
  make_pipeline  data/imagenet_latents.LatentPipeline instead of the in-memory one
  save_grid      decode latents with the VAE before drawing
  run_eval       FID/IS/precision/recall against ADM's reference batch (evaluation/imagenet.py)
pipeline.run should build this class when config.data.name == 'imagenet256_latents' (the
hooks are listed in docs/imagenet.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import pipeline
from hierdistill import sampling
from hierdistill import sharding as shard_lib
from hierdistill.config_checks import ConfigError, validate_config
from hierdistill.convert import from_config
from hierdistill.data import imagenet_latents
from hierdistill.stages import common

MOCK_LATENTS = "mock_latents"


def latents_dir_of(config, workdir: str) -> str:
  """config.data.latents_dir; for mock data with none set, <workdir>/mock_latents."""
  if config.data.latents_dir:
    return config.data.latents_dir
  if config.data.get("mock_num_examples", 0):
    return os.path.join(workdir, MOCK_LATENTS)
  return ""


def reference_batch_of(config, workdir: str) -> str:
  if config.eval.reference_batch:
    return config.eval.reference_batch
  if config.data.get("mock_num_examples", 0):
    return os.path.join(latents_dir_of(config, workdir), "reference.npz")
  return ""


PUBLISHED_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_published_checkpoint(path: str) -> bool:
  """A published PyTorch file (imported by convert/), not a directory of exported params."""
  return bool(path) and path.endswith(PUBLISHED_SUFFIXES)


@contextlib.contextmanager
def _train_set(dataset):
  """Stopgap until pipeline.load_train_set dispatches on config.data.name (docs/imagenet.md,
  hook H1): Chain.__init__ gets the latents' metadata instead of an in-memory data set."""
  original = pipeline.load_train_set
  pipeline.load_train_set = lambda data_config: dataset
  try:
    yield
  finally:
    pipeline.load_train_set = original


class ImageNetChain(pipeline.Chain):
  """pipeline.Chain over ImageNet latents (see the module docstring)."""

  def __init__(self, config, workdir: str, **kwargs):
    validate_config(config)
    from_config.check_files(config)  # one line naming the key, before anything compiles
    latents_dir = latents_dir_of(config, workdir)
    if config.data.get("mock_num_examples", 0) and not os.path.isfile(
        os.path.join(latents_dir, imagenet_latents.INFO_FILE)):
      print(f"[data] mock ImageNet -> latents in {latents_dir}", flush=True)
      imagenet_latents.extract_from_config(
          config, latents_dir, reference_size=int(config.data.mock_num_examples))
    try:
      dataset = imagenet_latents.open_latents(latents_dir)
    except FileNotFoundError as e:
      raise ConfigError(str(e)) from None
    self._vae = None
    with _train_set(dataset):
      super().__init__(config, workdir, **kwargs)

  # -- the teacher: a published SiT/DiT file, imported -----------------------------------------

  @property
  def imports_published_teacher(self) -> bool:
    return is_published_checkpoint(self.config.teacher.get("init_checkpoint", ""))

  def _check_inputs(self, ignore_workdir: bool) -> None:
    if not self.imports_published_teacher:
      return super()._check_inputs(ignore_workdir)
    # The file exists (check_files); its keys and shapes are checked when it is imported, which
    # happens before any train step compiles. Stage 2's handoff is checked as Chain does.
    return self._check_stage_inputs(ignore_workdir)

  def _check_stage_inputs(self, ignore_workdir: bool) -> None:
    """Chain's checks of the stage-1 handoff, with the teacher taken as found."""
    stages = tuple(self.config.stages)
    fresh_from_stage1 = ("distribution" in stages and "trajectory" not in stages
                         and self.config.distribution.init_from == "trajectory")
    if fresh_from_stage1 and not ignore_workdir and not pipeline.ckpt_lib.is_finished(
        self.workdir, "trajectory", int(self.config.trajectory.num_steps)):
      raise ConfigError(
          f"stage 'distribution' starts from stage 1's result, but {self.workdir} has no "
          "finished trajectory stage; add 'trajectory' to config.stages, or set "
          "--config.distribution.init_from=teacher (DMD without stage 1).")

  @property
  def teacher_params(self):
    if self._teacher is None and self.imports_published_teacher:
      abstract, shardings = self.exported_shapes("teacher")
      params = from_config.load_teacher(self.config, self.nets.teacher)
      params = jax.tree.map(lambda a, s: np.asarray(a, s.dtype), params, abstract)
      self._teacher = jax.device_put(params, shardings)
    return super().teacher_params

  def load_export(self, stage: str):
    if stage == "teacher" and self.imports_published_teacher:
      return self.teacher_params
    return super().load_export(stage)

  # -- data and pictures ---------------------------------------------------------------------

  def make_pipeline(self, global_batch_size: int, seed: int):
    return imagenet_latents.LatentPipeline(
        self.dataset, global_batch_size, seed, scaling_factor=float(self.config.vae.scaling_factor),
        sampling=self.config.data.latent_sampling, flip=bool(self.config.data.flip),
        process_index=jax.process_index(), process_count=jax.process_count())

  @property
  def vae(self):
    if self._vae is None:
      model, params = from_config.load_vae(self.config)
      self._vae = (model, jax.device_put(params, shard_lib.replicated(self.mesh)))
    return self._vae

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """Scaled latents -> images in [-1, 1] (host numpy), in VAE batches."""
    from hierdistill.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top
    model, params = self.vae
    fn = jax.jit(lambda p, z: model.apply({"params": p}, z / model.scaling_factor,
                                          method=AutoencoderKL.decode))
    bs = int(self.config.vae.batch_size)
    return np.concatenate([np.asarray(fn(params, jnp.asarray(latents[i:i + bs])))
                           for i in range(0, len(latents), bs)])

  def save_grid(self, samples, path: str) -> None:
    from hierdistill.evaluation import grids  # pylint: disable=g-import-not-at-top
    grids.save_image_grid(np.clip(self.decode(np.asarray(samples)), -1.0, 1.0), path)

  # -- stages ----------------------------------------------------------------------------------

  def run_stage(self, name: str) -> dict:
    """pipeline.Chain.run_stage with the latent pipeline (until Chain grows make_pipeline)."""
    from hierdistill import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    from hierdistill.stages import loop  # pylint: disable=g-import-not-at-top
    cfg = getattr(self.config, name)
    if ckpt_lib.is_finished(self.workdir, name, int(cfg.num_steps)):
      print(f"[{name}] finished earlier ({cfg.num_steps} steps): skipped", flush=True)
      return {"status": "finished earlier"}
    stage = pipeline.build_stage(name, self.config, self.nets)
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

  def run(self) -> dict:
    t0 = time.time()
    summary: dict[str, Any] = {"workdir": os.path.abspath(self.workdir), "stages": {}}
    for name in self.config.stages:
      if name == "eval":
        summary["eval"] = run_imagenet_eval(self)
      else:
        summary["stages"][name] = self.run_stage(name)
    self.writer.flush()
    summary["wall_time_s"] = round(time.time() - t0, 1)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
      print(pipeline._format_summary(summary), flush=True)  # pylint: disable=protected-access
    return summary


def run_imagenet_eval(chain: ImageNetChain) -> dict:
  """The eval stage on ImageNet: every finished model of the chain, from the same noise and
  labels, against ADM's reference batch (evaluation/imagenet.py). Skipped when metrics.json
  exists. Writes <workdir>/eval/{metrics.json, metrics.md, samples_<row>.png[, .npz]}."""
  from hierdistill.evaluation import imagenet as ev_imagenet  # pylint: disable=g-import-not-at-top
  from hierdistill.stages import evaluate  # pylint: disable=g-import-not-at-top
  config, workdir, nets = chain.config, chain.workdir, chain.nets
  out_dir = os.path.join(workdir, "eval")
  metrics_path = os.path.join(out_dir, "metrics.json")
  if os.path.exists(metrics_path):
    print(f"[eval] finished earlier: {metrics_path}", flush=True)
    with open(metrics_path) as f:
      return {"metrics_path": metrics_path, **json.load(f)}
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  cfg, s = config.eval, config.sample
  vae, vae_params = chain.vae
  inception, inception_params = from_config.load_inception(config)
  reference_path = reference_batch_of(config, workdir)
  scorer = ev_imagenet.ImageNetScorer(
      vae=vae, vae_params=vae_params, inception=inception, inception_params=inception_params,
      reference=ev_imagenet.load_reference_batch(reference_path), mesh=chain.mesh,
      preprocessing=cfg.inception_preprocessing, inception_size=int(cfg.inception_size),
      batch_size=int(cfg.batch_size), random_inception=bool(cfg.random_inception),
      use_stored_reference_stats=bool(cfg.use_stored_reference_stats),
      is_split_size=int(cfg.is_split_size), pr_k=int(cfg.pr_k))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
  num_classes = config.model.num_classes

  def teacher_sampler(num_steps):
    def fn(params, noise, y):
      return sampling.sample_teacher(
          common.velocity_fn(nets.teacher, params), noise, y, num_steps=num_steps,
          method=s.teacher_method, cfg_scale=s.cfg_scale, cfg_interval=s.get("cfg_interval"),
          null_label=num_classes)
    return fn

  def student_sampler(num_steps):
    def fn(params, noise, y):
      u_fn = lambda z, r, t: common.apply_model(nets.student, params, z, r, t, y)
      return sampling.flow_map_sample(u_fn, noise, num_steps=num_steps)
    return fn

  models, plan = {}, []
  for stage in ("teacher", "trajectory", "distribution"):
    try:
      models[stage] = chain.load_export(stage)
    except FileNotFoundError:
      print(f"[eval] no finished {stage} stage in {workdir}: its rows are left out", flush=True)
  if "teacher" in models:
    for n in cfg.teacher_steps:
      plan.append((f"teacher ({n} step{'s' if n > 1 else ''})", "teacher", teacher_sampler(n),
                   sampling.teacher_nfe(n, s.teacher_method, s.cfg_scale)))
  for stage, label in (("trajectory", "stage 1 (TD)"), ("distribution", "stage 2 (HD)")):
    if stage in models:
      for n in cfg.student_steps:
        plan.append((f"{label} ({n} step{'s' if n > 1 else ''})", stage, student_sampler(n), n))

  rows = []
  for name, stage, fn, nfe in plan:
    t_row = time.time()
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    npz = os.path.join(out_dir, f"samples_{slug}.npz") if cfg.save_npz else None
    metrics, images = scorer.measure(
        fn, models[stage], num_samples=int(cfg.num_samples), latent_shape=chain.dataset.shape,
        num_classes=num_classes, key=key, keep_images=int(s.grid_size), save_npz=npz)
    row = {"model": name, "nfe": nfe, **metrics, "sampling_s": round(time.time() - t_row, 2)}
    rows.append(row)
    if jax.process_index() == 0:
      ev_imagenet.save_uint8_grid(images, os.path.join(out_dir, f"samples_{slug}.png"))
    chain.writer.write_scalars(0, {f"eval/{slug}/{k}": v for k, v in row.items()
                                   if isinstance(v, (int, float))})
    print(f"[eval] {evaluate._format_row(row)}", flush=True)  # pylint: disable=protected-access

  result = {
      "feature_net": ("random-width Inception (NOT FID)" if cfg.random_inception else
                      "FID Inception-v3 (pt_inception-2015-12-05), "
                      f"{cfg.inception_preprocessing} preprocessing"),
      "num_samples": int(cfg.num_samples),
      "reference": f"{reference_path} ({scorer.reference_size} images"
                   f"{', stored mu/sigma' if scorer.stored_stats is not None else ''})",
      "vae": ("random weights (tests; not SD-VAE)" if config.vae.random_init
              else f"SD-VAE {config.vae.variant}: {config.vae.path}"),
      "sample_encoding": "uint8 clip(127.5 x + 128), as DiT/SiT save PNGs",
      "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
  if jax.process_index() == 0:
    with open(metrics_path, "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "metrics.md"), "w") as f:
      f.write(evaluate.markdown_table(rows) + "\n")
    print(evaluate.markdown_table(rows), flush=True)
  return {"metrics_path": metrics_path, **result}


def run(config, workdir: str, **kwargs) -> dict:
  """pipeline.run for ImageNet configs."""
  return ImageNetChain(config, workdir, **kwargs).run()
