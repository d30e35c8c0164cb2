"""The product of a run: a generator that draws images from a trained network.

    gen = hierdistill.Generator.load("runs/digits")         # the last finished stage
    images = gen(jax.random.PRNGKey(0), [3, 7, 7], num_steps=1)   # (3, 8, 8, 1) in [-1, 1]

PATH is a workdir (its last finished stage, or the one named: stage='trajectory', 'teacher',
...) or a directory written by export.py (launch/export.py), which needs neither the workdir
nor the training config. Conditions are class labels, or prompts for a text model (the data
source encodes them: sources/base.DataSource.conditions_from_prompts), or a condition pytree
(conditions.py).

A student draws x = e - u(e, 0, 1 | c) in one step (the README's equation), or jumps along
its flow map in num_steps; a teacher integrates its ODE in num_steps with classifier-free
guidance (cfg_scale, default the run's sample.cfg_scale) against the null condition. Latent
models decode with their VAE inside the same program, so the result is in pixel space:
float32 (B, H, W, C) in [-1, 1] (2-D points (B, 2) for the toy data).

One program per (num_steps, cfg_scale) and batch size, compiled on first use; the batch is
split over every device present (padded to a multiple of their count, then trimmed).
Sample i's noise is row i of jax.random.normal(key, (B,) + shape): the same key gives the same
images on any number of devices (up to float rounding of the sharded program).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hierdistill import checkpoint as ckpt_lib
from hierdistill import conditions as cond_lib
from hierdistill import export
from hierdistill import sampling
from hierdistill import sharding as shard_lib
from hierdistill import sources
from hierdistill.models import block_stack
from hierdistill.config_checks import TRAINING_STAGES, ConfigError

# The last finished of these is what a workdir's generator is, unless a stage is named.
GENERATOR_STAGES = ("distribution", "trajectory", "teacher")


class Generator:
  """A trained network with what it takes to sample it (see the module docstring).

  model, params: the Flax network and its params (a student: interval_conditioning=True, or a
    teacher); conditions: the condition kind (conditions.Labels or conditions.Text, with its
    null); shape: one sample's shape in the model's space; sample_config: the run's `sample`
    block (the teacher's solver and guidance); data_name: the data source (for prompts);
    decoder: (module, params) of the VAE for a latent model, else None; info: what it is and
    where it came from (stored by export.py); prompt_config: the other run config blocks the
    data source reads to encode prompts (a SANA run's text_encoder and seed), else None.
  """

  def __init__(self, *, model, params, conditions, shape: Sequence[int], role: str,
               sample_config: dict, data_name: str, model_config: dict,
               decoder=None, info: Optional[dict] = None, devices=None,
               prompt_config: Optional[dict] = None):
    if role not in ("student", "teacher"):
      raise ValueError(f"role={role!r}; 'student' or 'teacher'.")
    self.model, self.conditions, self.role = model, conditions, role
    self.shape = tuple(int(s) for s in shape)
    self.sample_config = dict(sample_config)
    self.data_name, self.model_config = data_name, dict(model_config)
    self.prompt_config = dict(prompt_config or {})
    self.info = dict(info or {})
    self.mesh = shard_lib.make_mesh(-1, 1, devices=devices)
    rep = shard_lib.replicated(self.mesh)
    self.params = jax.device_put(params, rep)
    self.decoder = None if decoder is None else (decoder[0], jax.device_put(decoder[1], rep))
    self._programs = {}

  # -- loading -----------------------------------------------------------------------------------

  @classmethod
  def load(cls, path: str, stage: Optional[str] = None, *, devices=None) -> "Generator":
    """From a workdir (its last finished stage, or `stage`) or an export (export.py).
    ConfigError, one line, when path is neither or what it holds does not load."""
    if not os.path.isdir(path):
      raise ConfigError(f"{path}: no such directory; give a run's workdir or an exported "
                        "generator (launch/export.py).")
    if export.is_export(path):
      if stage is not None:
        raise ConfigError(f"{path} is an exported generator (one network); drop stage={stage!r}.")
      return cls(**export.read(path), devices=devices)
    return cls.from_workdir(path, stage, devices=devices)

  @classmethod
  def from_workdir(cls, workdir: str, stage: Optional[str] = None, *,
                   devices=None) -> "Generator":
    config = read_run_config(workdir)
    stage = stage or last_finished_stage(workdir, config)
    if stage not in TRAINING_STAGES:
      raise ConfigError(f"stage={stage!r}: choose one of {TRAINING_STAGES}.")
    steps = int(getattr(config, stage).num_steps)
    imported = stage == "teacher" and bool(config.teacher.get("init_checkpoint"))
    if not imported and not ckpt_lib.is_finished(workdir, stage, steps):
      raise ConfigError(f"{workdir} has no finished {stage} stage (no export at step {steps}); "
                        "train it first, or name another stage.")
    from hierdistill import pipeline  # pylint: disable=g-import-not-at-top  (heavy; on use)
    source = sources.source_class(config.data.name)
    conditions = source.condition_kind(config)
    shape = source.example_shape(config)
    nets = pipeline.Networks(config, conditions)
    student = stage != "teacher"
    model = nets.student if student else nets.teacher
    mesh = shard_lib.make_mesh(-1, 1, devices=devices)
    abstract = nets.abstract_params(shape, student=student)
    shardings = jax.tree.map(lambda _: shard_lib.replicated(mesh), abstract)
    try:
      if imported:
        params = _imported_teacher(config, nets.teacher, abstract, shardings)
      else:
        params = ckpt_lib.load_export(workdir, stage, abstract, shardings)
    except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
      raise ConfigError(f"{workdir}: the {stage} stage's params do not load "
                        f"({str(e).splitlines()[0]}).") from None
    decoder = _vae_of(config)
    info = {"workdir": os.path.abspath(workdir), "stage": stage, "step": steps,
            "experiment": config.get("name", "")}
    return cls(model=model, params=params, conditions=conditions, shape=shape,
               role="student" if student else "teacher",
               sample_config=config.sample.to_dict(), data_name=config.data.name,
               model_config=config.model.to_dict(), decoder=decoder, info=info,
               devices=devices, prompt_config=_prompt_config(config))

  def unrolled(self) -> "Generator":
    """This generator with its network's blocks unrolled (blocks_{i}: the published layout,
    the one every export writes; models/block_stack.py); itself when they already are."""
    if not getattr(self.model, "scan_blocks", False):
      return self
    out = copy.copy(self)
    out.model = self.model.clone(scan_blocks=False)
    out.params = jax.device_put(block_stack.unstack_blocks(self.params),
                                shard_lib.replicated(self.mesh))
    out.model_config = {**self.model_config, "scan_blocks": False}
    out._programs = {}  # pylint: disable=protected-access
    return out

  # -- conditions --------------------------------------------------------------------------------

  @property
  def is_text(self) -> bool:
    return self.conditions.kind == "text"

  def conditions_of(self, labels_or_prompts) -> Any:
    """A host condition pytree from labels (ints), prompts (strs), or a condition pytree."""
    c = labels_or_prompts
    if isinstance(c, dict):
      return {k: np.asarray(v) for k, v in c.items()}
    items = list(c) if not isinstance(c, (str, bytes)) else [c]
    if not items:
      raise ValueError("no conditions given: pass at least one label or prompt.")
    if all(isinstance(i, str) for i in items):
      if not self.is_text:
        raise ValueError(f"this generator is class-conditional ({self.conditions.describe()}): "
                         "give class labels, not prompts.")
      config = ml_collections.ConfigDict({"data": {"name": self.data_name},
                                          "model": self.model_config, **self.prompt_config})
      return sources.source_class(self.data_name).conditions_from_prompts(config, items)
    if self.is_text:
      raise ValueError("this generator reads text: give prompts (strings), not labels.")
    labels = np.asarray(items)
    if labels.dtype.kind not in "iu":
      raise ValueError(f"labels must be integers; got {items[:3]}...")
    k = self.conditions.num_classes
    if labels.min() < 0 or labels.max() > k:
      raise ValueError(f"labels must lie in 0..{k - 1} ({k} = the null label, unconditional); "
                       f"got {int(labels.min())}..{int(labels.max())}.")
    return labels.astype(np.int32)

  # -- sampling ----------------------------------------------------------------------------------

  def __call__(self, key: jax.Array, labels_or_prompts, num_steps: Optional[int] = None, *,
               cfg_scale: Optional[float] = None,
               times: Optional[Sequence[float]] = None) -> np.ndarray:
    """Samples, one per label or prompt, as host float32 (see the module docstring).

    num_steps: 1 by default for a student; the run's sample.teacher_steps for a teacher.
    cfg_scale: a teacher's guidance (default the run's sample.cfg_scale); a student was
    distilled from the guided teacher and takes none.
    times: a student's time grid from 1 down to 0 instead of the uniform one, e.g. (1, 0.75, 0)
    for two jumps through t = 0.75 (sampling.flow_map_sample); its steps are len(times) - 1.
    """
    c = self.conditions_of(labels_or_prompts)
    b = cond_lib.batch_size_of(c)
    if times is not None:
      if self.role != "student":
        raise ValueError("times is a student's (flow map's) time grid; a teacher takes "
                         "num_steps: drop times (or load the student).")
      times = sampling.check_times(times, num_steps)
      num_steps = len(times) - 1
    if num_steps is None:
      num_steps = 1 if self.role == "student" else int(self.sample_config["teacher_steps"])
    if self.role == "student" and cfg_scale is not None:
      raise ValueError("a student takes no cfg_scale: its guidance was distilled into it; "
                       "drop cfg_scale (or load the teacher: stage='teacher').")
    cfg = float(self.sample_config.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale)
    program = self._program(_check_steps(num_steps), cfg, times)
    noise = np.asarray(jax.random.normal(key, (b,) + self.shape, jnp.float32))
    padded = shard_lib.padded_batch_size(b, self.mesh)
    rows = np.resize(np.arange(b), padded)  # padding repeats rows; trimmed below
    batch = shard_lib.batch_sharding(self.mesh)
    noise = jax.device_put(noise[rows], batch)
    c = jax.device_put(cond_lib.take_rows(c, rows), batch)
    decoder_params = None if self.decoder is None else self.decoder[1]
    out = program(self.params, decoder_params, noise, c)
    return np.asarray(jax.device_get(out))[:b]

  def _program(self, num_steps: int, cfg_scale: float, times: Optional[tuple] = None):
    """The jitted sampler (and decoder) for these settings; jax caches it per batch shape."""
    if (num_steps, cfg_scale, times) in self._programs:
      return self._programs[(num_steps, cfg_scale, times)]
    model, conditions, role = self.model, self.conditions, self.role
    sample_block = ml_collections.ConfigDict(
        {"sample": dict(self.sample_config, cfg_scale=cfg_scale)})
    decoder = self.decoder[0] if self.decoder is not None else None
    images_like = len(self.shape) == 3

    def program(params, decoder_params, noise, c):
      if role == "student":
        u_fn = lambda z, r, t: sampling.apply_model(model, params, z, r, t, c)
        x = sampling.flow_map_sample(u_fn, noise, num_steps=num_steps, times=times)
      else:
        x = sampling.sample_teacher_from_config(sample_block, model, conditions, params, noise,
                                                c, num_steps=num_steps)
      if decoder is not None:  # the model's latents -> the VAE's -> pixels
        from hierdistill.models import vae  # pylint: disable=g-import-not-at-top
        # DC-AE (SANA) has a scaling factor only; SD-VAE and VA-VAE their latent affine.
        z = (vae.unscale_latents(decoder, x) if hasattr(decoder, "latent_mean")
             else x / decoder.scaling_factor)
        x = decoder.apply({"params": decoder_params}, z, method=type(decoder).decode)
      return jnp.clip(x, -1.0, 1.0) if images_like or decoder is not None else x

    rep = shard_lib.replicated(self.mesh)
    fn = shard_lib.under_mesh(jax.jit(program, out_shardings=rep), self.mesh)
    self._programs[(num_steps, cfg_scale, times)] = fn
    return fn

  def nfe(self, num_steps: Optional[int] = None, cfg_scale: Optional[float] = None) -> int:
    """Network passes per sample (sampling.teacher_nfe's convention for a teacher)."""
    if self.role == "student":
      return int(num_steps or 1)
    s = self.sample_config
    return sampling.teacher_nfe(int(num_steps or s["teacher_steps"]), s["teacher_method"],
                                float(s["cfg_scale"] if cfg_scale is None else cfg_scale))

  def describe(self) -> str:
    what = {"student": "one-step student", "teacher": "teacher"}[self.role]
    origin = self.info.get("workdir") or self.info.get("export") or "?"
    stage = f" ({self.info['stage']} stage)" if self.info.get("stage") else ""
    return (f"{what}{stage} from {origin}: {type(self.model).__name__}, samples of shape "
            f"{self.shape}, {self.conditions.describe()}"
            f"{', decoded by its VAE' if self.decoder is not None else ''}")


# -- helpers -------------------------------------------------------------------------------------

def _check_steps(num_steps) -> int:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: give an integer >= 1.")
  return int(num_steps)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in workdir stored (workdir.write_config); ConfigError when absent."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{workdir} is neither a run's workdir nor an exported generator (it has "
                      "no config.json); give the --workdir of a run, or the --out of "
                      "launch/export.py.")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({type(e).__name__}); repair it or give another "
                      "workdir.") from None


def last_finished_stage(workdir: str, config) -> str:
  """The latest stage of the chain with a finished checkpoint (its export)."""
  for stage in GENERATOR_STAGES:
    if stage in config and ckpt_lib.is_finished(workdir, stage,
                                                int(getattr(config, stage).num_steps)):
      return stage
  raise ConfigError(f"{workdir} has no finished stage yet (no final checkpoint of "
                    f"{', '.join(reversed(GENERATOR_STAGES))}); let the run finish a stage, "
                    "then sample.")


def _imported_teacher(config, teacher, abstract, shardings):
  """config.teacher.init_checkpoint: a published SiT/DiT file or a directory of params."""
  path = config.teacher.init_checkpoint
  if str(path).endswith((".pt", ".pth", ".bin", ".safetensors")):
    from hierdistill.convert import from_config  # pylint: disable=g-import-not-at-top
    params = from_config.load_teacher(config, teacher)
    params = jax.tree.map(lambda a, s: np.asarray(a, s.dtype), params, abstract)
    return jax.device_put(params, shardings)
  return ckpt_lib.load_params(path, abstract, shardings)


def _prompt_config(config) -> dict:
  """The run's blocks a text source encodes prompts with besides data and model: a SANA run's
  text encoder (its files, or the seed of runlocal's random one)."""
  return {k: (config[k].to_dict() if hasattr(config[k], "to_dict") else config[k])
          for k in ("text_encoder", "seed") if k in config}


def _vae_of(config):
  """(VAE, params) of a latent run (its config has a `vae` block: AutoencoderKL, or DC-AE for
  SANA), else None."""
  if "vae" not in config:
    return None
  from hierdistill.convert import from_config  # pylint: disable=g-import-not-at-top
  try:
    if config.model.get("name") == "sana":  # SANA's autoencoder is DC-AE, its source's loader
      from hierdistill.sources import mjhq  # pylint: disable=g-import-not-at-top
      return mjhq.load_dcae(config, int(config.get("seed", 0)))
    return from_config.load_vae(config)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"the run's VAE does not load ({str(e).splitlines()[0]}).") from None


# -- export ------------------------------------------------------------------------------------

def write_export(gen: Generator, out_dir: str, *, run_config, eval_dir: Optional[str] = None,
                 grid_size: int = 64, name: Optional[str] = None) -> dict:
  """export.write's files, then the sample grid and the model card. The grid comes from the
  export itself, loaded as a user would: what it shows is what loads. name: the directory's
  final name for the card (default out_dir's own)."""
  meta = export.write(gen.unrolled(), out_dir, run_config=run_config, eval_dir=eval_dir)
  exported = Generator.load(out_dir)
  labels_or_prompts = export.grid_conditions(exported, grid_size)
  samples = exported(jax.random.PRNGKey(export.GRID_SEED), labels_or_prompts)
  export.save_samples(samples, os.path.join(out_dir, export.GRID_FILE), exported,
                      labels_or_prompts)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(export.model_card(meta, out_dir, name))
  return meta


def export_run(workdir: str, out_dir: str, stage: Optional[str] = None, *,
               grid_size: int = 64, fmt: str = "hierdistill", num_steps: int = 1) -> dict:
  """Exports a run's generator (its last finished stage, or `stage`) to out_dir; returns the
  export's config. out_dir must not hold anything yet (nothing is overwritten). fmt: this
  library's format, or one a published codebase loads (export_formats.FORMATS: the one-step
  student only, num_steps=1)."""
  from hierdistill import export_formats  # pylint: disable=g-import-not-at-top
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise ConfigError(f"--out={out_dir} is not empty; give a new directory (an export never "
                      "overwrites files).")
  config = read_run_config(workdir)
  gen = Generator.from_workdir(workdir, stage).unrolled()
  export_formats.check_request(gen, fmt, num_steps)
  tmp = f"{os.path.normpath(out_dir)}.partial-{os.getpid()}"
  os.makedirs(tmp)
  try:
    # The card names the final directory, not the temporary one it is written in.
    name = os.path.basename(os.path.normpath(out_dir))
    if fmt == "hierdistill":
      meta = write_export(gen, tmp, run_config=config, eval_dir=os.path.join(workdir, "eval"),
                          grid_size=grid_size, name=name)
    else:
      meta = export_formats.write(gen, tmp, fmt, run_config=config, name=name)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty: checked above
    os.replace(tmp, out_dir)  # a killed export leaves only <out>.partial-<pid>
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta
