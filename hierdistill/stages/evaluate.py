"""The 'eval' stage: every model of the chain, sampled from the same noise and labels, measured
against the same reference set with the same feature net and the same sample count.

Rows: the teacher at each of config.eval.teacher_steps (its full count, and 1, 2, 4 steps, to
show what a plain few-step teacher loses), the stage-1 student and the stage-2 student at each
of config.eval.student_steps. Columns for images: FD in the feature space of the digits
classifier ("FD-digits", never FID), precision and recall (k = 3), the Inception Score formula
over that classifier's labels ("IS-digits"), class accuracy of class-conditional samples, NFE.
For 2-D points: FD on the raw coordinates, precision/recall, mode coverage, off-mode share.
Writes <workdir>/eval/metrics.json, TensorBoard scalars and a sample grid per row.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import evaluation as ev
from hierdistill import sampling
from hierdistill import sharding as shard_lib
from hierdistill.stages import common


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
  """Scores models of a pipeline.Chain: same noise, labels, reference, feature net and count.

  evaluator.teacher(params, num_steps) and evaluator.student(params, num_steps) each return one
  row: {'model', 'nfe', metric columns..., 'sampling_s'}, and keep the samples for grids.
  """

  def __init__(self, chain):
    from hierdistill.pipeline import data_dir_of  # pylint: disable=g-import-not-at-top
    self.chain = chain
    config = chain.config
    self.cfg = config.eval
    self.num_classes = config.model.num_classes
    self.scorer = _Scorer(config, chain.dataset.x, chain.dataset.y, chain.dataset.name,
                          data_dir_of(config.data))
    # One key for every model: the rows differ by the model alone, not by the noise.
    self.key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
    self.last_samples = None

  def _row(self, name, nfe, sample_fn, params) -> dict:
    t0 = time.time()
    samples, labels = _generate(sample_fn, params, int(self.cfg.num_samples),
                                int(self.cfg.batch_size), self.chain.dataset.shape,
                                self.num_classes, self.key, self.chain.mesh)
    self.last_samples = samples
    return {"model": name, "nfe": nfe, **self.scorer(samples, labels),
            "sampling_s": round(time.time() - t0, 2)}

  def teacher(self, params, num_steps: int, name: str = None) -> dict:
    s = self.chain.config.sample
    teacher = self.chain.nets.teacher

    def fn(params, noise, y):
      return sampling.sample_teacher(
          common.velocity_fn(teacher, params), noise, y, num_steps=num_steps,
          method=s.teacher_method, cfg_scale=s.cfg_scale, cfg_interval=s.get("cfg_interval"),
          null_label=self.num_classes)

    name = name or f"teacher ({_steps(num_steps)})"
    return self._row(name, sampling.teacher_nfe(num_steps, s.teacher_method, s.cfg_scale), fn,
                     params)

  def student(self, params, num_steps: int, name: str) -> dict:
    student = self.chain.nets.student

    def fn(params, noise, y):
      u_fn = lambda z, r, t: common.apply_model(student, params, z, r, t, y)
      return sampling.flow_map_sample(u_fn, noise, num_steps=num_steps)

    return self._row(f"{name} ({_steps(num_steps)})", num_steps, fn, params)

  def describe(self) -> dict:
    """What every row was measured with, to store beside the numbers."""
    return {"feature_net": self.scorer.feature_name, "num_samples": int(self.cfg.num_samples),
            "reference": f"{self.chain.dataset.name} train split, "
                         f"{self.scorer.reference_size} examples",
            **self.scorer.info}


def _steps(n: int) -> str:
  return f"{n} step{'s' if n > 1 else ''}"


def run_eval(chain):
  """Measures every finished model of a pipeline.Chain; skipped when metrics.json exists."""
  out_dir = os.path.join(chain.workdir, "eval")
  metrics_path = os.path.join(out_dir, "metrics.json")
  if os.path.exists(metrics_path):
    print(f"[eval] finished earlier: {metrics_path}", flush=True)
    with open(metrics_path) as f:
      return {"metrics_path": metrics_path, **json.load(f)}
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  cfg = chain.config.eval
  evaluator = Evaluator(chain)

  models = {}
  for stage in ("teacher", "trajectory", "distribution"):
    try:
      models[stage] = chain.load_export(stage)
    except FileNotFoundError:
      print(f"[eval] no finished {stage} stage in {chain.workdir}: its rows are left out",
            flush=True)
  plan = []
  if "teacher" in models:
    plan += [lambda n=n: evaluator.teacher(models["teacher"], n) for n in cfg.teacher_steps]
  for stage, label in (("trajectory", "stage 1 (TD)"), ("distribution", "stage 2 (HD)")):
    if stage in models:
      plan += [lambda n=n, stage=stage, label=label: evaluator.student(models[stage], n, label)
               for n in cfg.student_steps]

  rows = []
  for make_row in plan:
    row = make_row()
    rows.append(row)
    slug = row["model"].replace(" ", "_").replace("(", "").replace(")", "")
    if jax.process_index() == 0:
      chain.save_grid(evaluator.last_samples[:int(chain.config.sample.grid_size)],
                      os.path.join(out_dir, f"samples_{slug}.png"))
    chain.writer.write_scalars(0, {f"eval/{slug}/{k}": v for k, v in row.items()
                                   if isinstance(v, (int, float))})
    print(f"[eval] {_format_row(row)}", flush=True)

  result = {**evaluator.describe(), "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
  if jax.process_index() == 0:
    with open(metrics_path, "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "metrics.md"), "w") as f:
      f.write(markdown_table(rows) + "\n")
    print(markdown_table(rows), flush=True)
  return {"metrics_path": metrics_path, **result}


def _format_row(row: dict) -> str:
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
