"""The 'eval' stage: every model of the chain, sampled from the same noise and labels, measured
against the same reference set with the same feature net and the same sample count.

Rows: the teacher at each of config.eval.teacher_steps (its full count, and 1, 2, 4 steps, to
show what a plain few-step teacher loses), the stage-1 student and the stage-2 student at each
of config.eval.student_steps. Columns for images: FD in the feature space of the digits
classifier ("FD-digits", never FID), precision and recall (k = 3), Inception-style score of that
classifier, class accuracy of class-conditional samples, NFE. For 2-D points: FD on the raw
coordinates, precision/recall, mode coverage and the off-mode share.
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
      self.features = lambda x: tuple(np.asarray(a) for a in apply_fn(x))
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
      row["classifier_score"] = ev.inception_score(logits)[0]
      if self.conditional:
        row["class_accuracy"] = ev.class_accuracy(logits, labels)
    if self.is_points:
      row["mode_coverage"] = ev.mode_coverage(samples, self.modes, self.std)
      row["off_mode_fraction"] = ev.off_mode_fraction(samples, self.modes, self.std)
    return {k: float(v) for k, v in row.items()}


def run_eval(chain):
  """Measures every finished model of a pipeline.Chain; skipped when metrics.json exists."""
  from hierdistill.pipeline import data_dir_of  # pylint: disable=g-import-not-at-top
  config, workdir, nets, dataset = chain.config, chain.workdir, chain.nets, chain.dataset
  out_dir = os.path.join(workdir, "eval")
  metrics_path = os.path.join(out_dir, "metrics.json")
  if os.path.exists(metrics_path):
    print(f"[eval] finished earlier: {metrics_path}", flush=True)
    with open(metrics_path) as f:
      return {"metrics_path": metrics_path, **json.load(f)}
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  cfg = config.eval
  scorer = _Scorer(config, dataset.x, dataset.y, dataset.name, data_dir_of(config.data))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
  num_classes = config.model.num_classes
  s = config.sample

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

  rows = []
  models = {}
  for stage in ("teacher", "trajectory", "distribution"):
    try:
      models[stage] = chain.load_export(stage)
    except FileNotFoundError:
      print(f"[eval] no finished {stage} stage in {workdir}: its rows are left out", flush=True)
  plan = []
  if "teacher" in models:
    for n in cfg.teacher_steps:
      plan.append((f"teacher ({n} step{'s' if n > 1 else ''})", "teacher", teacher_sampler(n),
                   sampling.teacher_nfe(n, s.teacher_method, s.cfg_scale)))
  for stage, label in (("trajectory", "stage 1 (TD)"), ("distribution", "stage 2 (HD)")):
    if stage in models:
      for n in cfg.student_steps:
        plan.append((f"{label} ({n} step{'s' if n > 1 else ''})", stage, student_sampler(n), n))

  for name, stage, fn, nfe in plan:
    t_row = time.time()
    samples, labels = _generate(fn, models[stage], int(cfg.num_samples), int(cfg.batch_size),
                                dataset.shape, num_classes, key, chain.mesh)
    row = {"model": name, "nfe": nfe, **scorer(samples, labels)}
    row["sampling_s"] = round(time.time() - t_row, 2)
    rows.append(row)
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    if jax.process_index() == 0:
      chain.save_grid(samples[:int(s.grid_size)], os.path.join(out_dir, f"samples_{slug}.png"))
    chain.writer.write_scalars(0, {f"eval/{slug}/{k}": v for k, v in row.items()
                             if isinstance(v, (int, float))})
    print(f"[eval] {_format_row(row)}", flush=True)

  result = {"feature_net": scorer.feature_name, "num_samples": int(cfg.num_samples),
            "reference": f"{dataset.name} train split, {scorer.reference_size} examples",
            **scorer.info, "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
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
