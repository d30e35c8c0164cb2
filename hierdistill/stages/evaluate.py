"""The 'eval' stage: every model of the chain, sampled from the same noise and labels, measured
against the same reference set with the same feature net and the same sample count.

Rows (plan_rows): the teacher at each of config.eval.teacher_steps (its full count, and 1, 2, 4
steps, to show what a plain few-step teacher loses), the stage-1 student and the stage-2 student
at each of config.eval.student_steps. run_eval measures them and writes
<workdir>/eval/{metrics.json, metrics.md, samples_<row>.png}, TensorBoard scalars and a console
line per row; only the scorer differs between data sources. A scorer has:
  measure(sample_fn, params, files_prefix) -> (metric columns, samples to draw): samples of
      sample_fn(params, noise, y), noise from eval_key and labels cycling through the classes;
      files_prefix (<workdir>/eval/samples_<row>, no extension) is where it may write more
  describe() -> what every row was measured with, stored beside the rows
  save_grid(samples, path) -> a PNG of the samples measure returned
Evaluator is the scorer of the embedded data sets; imagenet_chain.ImageNetEval scores ImageNet
latents with Inception (evaluation/imagenet.py).

Evaluator's columns for images: FD in the feature space of the digits classifier ("FD-digits",
never FID), precision and recall (k = 3), the Inception Score formula over that classifier's
labels ("IS-digits"), class accuracy of class-conditional samples. For 2-D points: FD on the raw
coordinates, precision/recall, mode coverage, off-mode share. Every row also has the model's
name, its NFE and its sampling time.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import evaluation as ev
from hierdistill import sampling
from hierdistill import sharding as shard_lib
from hierdistill.stages import common

EVAL_SALT = 0xE7A1
STUDENT_LABELS = (("trajectory", "stage 1 (TD)"), ("distribution", "stage 2 (HD)"))


def eval_key(config) -> jax.Array:
  """One key for every row: the rows differ by the model alone, not by the noise."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_SALT)


# -- the rows ----------------------------------------------------------------------------------

def teacher_sampler(chain, num_steps: int) -> Callable:
  """(params, noise, y) -> samples of the teacher's ODE, with config.sample's solver and CFG."""
  s, teacher = chain.config.sample, chain.nets.teacher
  null_label = chain.config.model.num_classes

  def fn(params, noise, y):
    return sampling.sample_teacher(
        common.velocity_fn(teacher, params), noise, y, num_steps=num_steps,
        method=s.teacher_method, cfg_scale=s.cfg_scale, cfg_interval=s.get("cfg_interval"),
        guided_channels=s.get("guided_channels"),
        null_label=null_label)
  return fn


def teacher_nfe(chain, num_steps: int) -> int:
  s = chain.config.sample
  return sampling.teacher_nfe(num_steps, s.teacher_method, s.cfg_scale)


def student_sampler(chain, num_steps: int) -> Callable:
  """(params, noise, y) -> samples of the flow map in num_steps jumps."""
  student = chain.nets.student

  def fn(params, noise, y):
    u_fn = lambda z, r, t: common.apply_model(student, params, z, r, t, y)
    return sampling.flow_map_sample(u_fn, noise, num_steps=num_steps)
  return fn


class Row(NamedTuple):
  name: str  # e.g. 'stage 2 (HD) (1 step)'
  stage: str  # whose params it samples: 'teacher', 'trajectory' or 'distribution'
  sample_fn: Callable  # (params, noise, y) -> samples
  nfe: int


def load_models(chain) -> dict[str, Any]:
  """The EMA params of every finished stage of the chain (the teacher as imported, if so)."""
  models = {}
  for stage in ("teacher", "trajectory", "distribution"):
    try:
      models[stage] = chain.load_export(stage)
    except FileNotFoundError:
      print(f"[eval] no finished {stage} stage in {chain.workdir}: its rows are left out",
            flush=True)
  return models


def plan_rows(chain, stages) -> list[Row]:
  """The rows for the finished `stages`: the teacher at each of eval.teacher_steps, then stage 1
  and stage 2 at each of eval.student_steps."""
  cfg, rows = chain.config.eval, []
  if "teacher" in stages:
    rows += [Row(f"teacher ({_steps(n)})", "teacher", teacher_sampler(chain, n),
                 teacher_nfe(chain, n)) for n in cfg.teacher_steps]
  for stage, label in STUDENT_LABELS:
    if stage in stages:
      rows += [Row(f"{label} ({_steps(n)})", stage, student_sampler(chain, n), n)
               for n in cfg.student_steps]
  return rows


def measure_row(scorer, name: str, nfe: int, sample_fn, params, files_prefix=None):
  """(row, samples): {'model', 'nfe', metric columns..., 'sampling_s'} and what to draw."""
  t0 = time.time()
  metrics, samples = scorer.measure(sample_fn, params, files_prefix)
  return ({"model": name, "nfe": nfe, **metrics, "sampling_s": round(time.time() - t0, 2)},
          samples)


def run_eval(chain, make_scorer: Callable | None = None) -> dict:
  """Measures every finished model of a pipeline.Chain; skipped when metrics.json exists.

  make_scorer(chain) -> the scorer (see the module docstring; default Evaluator), built only
  when there is work to do. Returns {'metrics_path', what metrics.json holds}.
  """
  out_dir = os.path.join(chain.workdir, "eval")
  metrics_path = os.path.join(out_dir, "metrics.json")
  if os.path.exists(metrics_path):
    print(f"[eval] finished earlier: {metrics_path}", flush=True)
    with open(metrics_path) as f:
      return {"metrics_path": metrics_path, **json.load(f)}
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  scorer = (make_scorer or Evaluator)(chain)
  models = load_models(chain)
  grid_size = int(chain.config.sample.grid_size)

  rows = []
  for plan in plan_rows(chain, models):
    slug = plan.name.replace(" ", "_").replace("(", "").replace(")", "")
    prefix = os.path.join(out_dir, f"samples_{slug}")
    row, samples = measure_row(scorer, plan.name, plan.nfe, plan.sample_fn, models[plan.stage],
                               prefix)
    rows.append(row)
    if jax.process_index() == 0:
      scorer.save_grid(samples[:grid_size], prefix + ".png")
    chain.writer.write_scalars(0, {f"eval/{slug}/{k}": v for k, v in row.items()
                                   if isinstance(v, (int, float))})
    print(f"[eval] {format_row(row)}", flush=True)

  result = {**scorer.describe(), "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
  if jax.process_index() == 0:
    with open(metrics_path, "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "metrics.md"), "w") as f:
      f.write(markdown_table(rows) + "\n")
    print(markdown_table(rows), flush=True)
  return {"metrics_path": metrics_path, **result}


# -- the scorer of the embedded data sets --------------------------------------------------------

def _generate(sample_fn, params, num_samples, batch_size, shape, num_classes, key, mesh):
  """num_samples samples in batches spread over the mesh; labels cycle through the classes."""
  out = []
  fn = jax.jit(sample_fn, in_shardings=(None, shard_lib.batch_sharding(mesh),
                                        shard_lib.batch_sharding(mesh)),
               out_shardings=shard_lib.replicated(mesh))
  labels = np.arange(num_samples, dtype=np.int32) % num_classes
  for start in range(0, num_samples, batch_size):
    n = min(batch_size, num_samples - start)
    noise = jax.random.normal(jax.random.fold_in(key, start), (batch_size,) + tuple(shape))
    y = np.resize(labels[start:start + n], batch_size)  # pad the last batch; trimmed below
    out.append(np.asarray(jax.device_get(fn(params, noise, jnp.asarray(y))))[:n])
  return np.concatenate(out), labels


class _Scorer:
  """Feature statistics of the reference set, and the metrics of a set of samples against it."""

  def __init__(self, config, reference_x, reference_y, dataset_name, data_dir):
    self.is_points = reference_x.ndim == 2
    self.conditional = config.model.num_classes > 1
    self.info = {}
    if self.is_points:
      from hierdistill.data import toy2d  # pylint: disable=g-import-not-at-top
      self.modes = toy2d.modes(dataset_name)
      self.std = toy2d.STD
      self.features = lambda x: (np.asarray(x, np.float64), None)
      self.feature_name = "FD-points"
    else:
      apply_fn, info = ev.load_or_train_digits_classifier(data_dir)
      self.info = {"classifier_test_accuracy": info["test_accuracy"]}
      self.features = lambda x: ev.compute_features(apply_fn, x)
      self.feature_name = "FD-digits"
    self.ref_features, _ = self.features(reference_x)
    self.ref_stats = ev.feature_statistics(self.ref_features)
    self.reference_size = len(reference_x)

  def __call__(self, samples, labels) -> dict:
    feats, logits = self.features(samples)
    mu, sigma = ev.feature_statistics(feats)
    precision, recall = ev.precision_recall(self.ref_features, feats, k=3)
    row = {self.feature_name: ev.frechet_distance(*self.ref_stats, mu, sigma),
           "precision": precision, "recall": recall}
    if logits is not None:
      # The Inception Score's formula in the digits classifier's label space.
      row["IS-digits"] = ev.inception_score(logits)[0]
      if self.conditional:
        row["class_accuracy"] = ev.class_accuracy(logits, labels)
    if self.is_points:
      row["mode_coverage"] = ev.mode_coverage(samples, self.modes, self.std)
      row["off_mode_fraction"] = ev.off_mode_fraction(samples, self.modes, self.std)
    return {k: float(v) for k, v in row.items()}


class Evaluator:
  """The scorer of the embedded data sets (digits, 2-D points), for a pipeline.Chain holding
  them in memory: samples on the mesh, features and metrics on the host.

  Also used alone (benchmarks/hd_table.py): evaluator.teacher(params, num_steps) and
  evaluator.student(params, num_steps, name) each return one row and keep the samples in
  last_samples, for grids.
  """

  def __init__(self, chain):
    from hierdistill.pipeline import data_dir_of  # pylint: disable=g-import-not-at-top
    self.chain = chain
    config = chain.config
    self.cfg = config.eval
    self.num_classes = config.model.num_classes
    self.scorer = _Scorer(config, chain.dataset.x, chain.dataset.y, chain.dataset.name,
                          data_dir_of(config.data))
    self.key = eval_key(config)
    self.last_samples = None

  def measure(self, sample_fn, params, files_prefix=None):
    """(metric columns, every sample); files_prefix is not used (nothing beyond the grid)."""
    del files_prefix
    samples, labels = _generate(sample_fn, params, int(self.cfg.num_samples),
                                int(self.cfg.batch_size), self.chain.dataset.shape,
                                self.num_classes, self.key, self.chain.mesh)
    self.last_samples = samples
    return self.scorer(samples, labels), samples

  def save_grid(self, samples, path: str) -> None:
    self.chain.save_grid(samples, path)

  def teacher(self, params, num_steps: int, name: str = None) -> dict:
    name = name or f"teacher ({_steps(num_steps)})"
    return measure_row(self, name, teacher_nfe(self.chain, num_steps),
                       teacher_sampler(self.chain, num_steps), params)[0]

  def student(self, params, num_steps: int, name: str) -> dict:
    return measure_row(self, f"{name} ({_steps(num_steps)})", num_steps,
                       student_sampler(self.chain, num_steps), params)[0]

  def describe(self) -> dict:
    """What every row was measured with, to store beside the numbers."""
    return {"feature_net": self.scorer.feature_name, "num_samples": int(self.cfg.num_samples),
            "reference": f"{self.chain.dataset.name} train split, "
                         f"{self.scorer.reference_size} examples",
            **self.scorer.info}


# -- formatting --------------------------------------------------------------------------------

def _steps(n: int) -> str:
  return f"{n} step{'s' if n > 1 else ''}"


def format_row(row: dict) -> str:
  """A row on one console line: key=value, floats to 4 significant digits."""
  return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def markdown_table(rows: list[dict]) -> str:
  """The rows as a markdown table, columns in first-seen order."""
  cols = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(
        f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
  return "\n".join(lines)
