"""The scorer of the embedded data sets (digits, Fashion-MNIST, 2-D points) held in memory.

Columns for images: FD in the feature space of the set's own classifier (feature_net.py:
"FD-digits", "FD-fashion", never FID), precision and recall (k = 3), the Inception Score formula
over that classifier's labels ("IS-digits", "IS-fashion"), class accuracy of class-conditional
samples. For 2-D points: FD on the raw coordinates, precision/recall, mode coverage, off-mode
share. For both, per-class coverage (coverage.py): the samples' label histogram (the
classifier's labels; for points, the nearest mode) against the reference data's. The reference
set is the training split, or a fixed subset of config.eval.reference_size examples of it (the
k-NN radii of precision/recall cost O(N^2): 60,000 Fashion-MNIST images would take about a
minute a row on a 2-core CPU, 10,000 take 2 s). Samples are drawn on the mesh, features and
metrics computed on the host.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import conditions as cond_lib
from hierdistill import evaluation as ev
from hierdistill import sharding as shard_lib
from hierdistill.data import toy2d
from hierdistill.evaluation import coverage
from hierdistill.evaluation import driver
from hierdistill.evaluation import feature_net

# The reference subset is the same in every run, row and seed: it depends on this seed alone.
REFERENCE_SEED = 20261201


def reference_subset(x: np.ndarray, size: int) -> np.ndarray:
  """A fixed subset of `size` rows of x (sorted), or all of x when size is 0 or >= len(x)."""
  if not size or size >= len(x):
    return x
  return x[np.sort(np.random.default_rng(REFERENCE_SEED).permutation(len(x))[:size])]


def generate(sample_fn, params, conditions: Any, batch_size: int, shape, key, mesh
             ) -> np.ndarray:
  """One sample per row of `conditions` (a host pytree), in batches spread over the mesh.

  Sample i's noise depends only on i and key (batch `start` draws from fold_in(key, start)), so
  every row of the eval table sees the same noise. The last batch is padded by cycling its own
  rows and trimmed; every batch is padded the same way to a multiple of the mesh's devices (so
  any batch_size runs on any mesh, with the same samples).
  """
  num_samples = cond_lib.batch_size_of(conditions)
  batch = shard_lib.batch_sharding(mesh)
  padded = shard_lib.padded_batch_size(batch_size, mesh)
  fn = jax.jit(sample_fn, in_shardings=(None, batch, batch),
               out_shardings=shard_lib.replicated(mesh))
  out = []
  for start in range(0, num_samples, batch_size):
    n = min(batch_size, num_samples - start)
    noise = jax.random.normal(jax.random.fold_in(key, start), (batch_size,) + tuple(shape))
    noise = jnp.asarray(np.resize(np.asarray(noise)[:n], (padded,) + tuple(shape)))
    rows = np.resize(np.arange(start, start + n), padded)
    c = jax.tree.map(jnp.asarray, cond_lib.take_rows(conditions, rows))
    out.append(np.asarray(jax.device_get(fn(params, noise, c)))[:n])
  return np.concatenate(out)


class ReferenceScorer:
  """Feature statistics of the reference set, and the metrics of a set of samples against it.

  dataset_name picks the feature space: 2-D points are scored on their coordinates (and their
  mixture's modes), images by the set's classifier (feature_net.CLASSIFIERS) trained once under
  data_dir.
  """

  def __init__(self, reference_x: np.ndarray, dataset_name: str, data_dir: str,
               conditional: bool):
    self.is_points = reference_x.ndim == 2
    self.conditional = conditional
    self.info = {}
    if self.is_points:
      self.modes = toy2d.modes(dataset_name)
      self.std = toy2d.STD
      self.features = lambda x: (np.asarray(x, np.float64), None)
      self.feature_name = "FD-points"
    else:
      apply_fn, info = feature_net.load_or_train_classifier(dataset_name, data_dir)
      self.info = {"classifier_test_accuracy": info["test_accuracy"]}
      self.features = lambda x: ev.compute_features(apply_fn, x)
      suffix = feature_net.CLASSIFIERS[dataset_name].metric_suffix
      self.feature_name, self.is_name = f"FD-{suffix}", f"IS-{suffix}"
    self.ref_features, ref_logits = self.features(reference_x)
    self.ref_stats = ev.feature_statistics(self.ref_features)
    self.reference_size = len(reference_x)
    self.num_labels = len(self.modes) if self.is_points else ref_logits.shape[-1]
    self.ref_histogram = coverage.class_histogram(
        self._labels(reference_x, ref_logits), self.num_labels)

  def _labels(self, samples: np.ndarray, logits: Optional[np.ndarray]) -> np.ndarray:
    """The class each sample is seen as: the classifier's argmax, or a point's nearest mode
    (-1 when it is near none)."""
    if self.is_points:
      return ev.assign_modes(samples, self.modes, self.std)
    return np.argmax(np.asarray(logits), axis=-1)

  def class_histogram(self, samples: np.ndarray, logits: Optional[np.ndarray] = None
                      ) -> np.ndarray:
    """The samples' label histogram (K,), comparable with self.ref_histogram."""
    if logits is None and not self.is_points:
      _, logits = self.features(samples)
    return coverage.class_histogram(self._labels(samples, logits), self.num_labels)

  def __call__(self, samples: np.ndarray, labels: Optional[np.ndarray]) -> dict:
    """The metric columns; labels: the class each sample was asked for (None: not scored)."""
    feats, logits = self.features(samples)
    mu, sigma = ev.feature_statistics(feats)
    precision, recall = ev.precision_recall(self.ref_features, feats, k=3)
    row = {self.feature_name: ev.frechet_distance(*self.ref_stats, mu, sigma),
           "precision": precision, "recall": recall}
    if logits is not None:
      # The Inception Score's formula in the set's classifier's label space.
      row[self.is_name] = ev.inception_score(logits)[0]
      if self.conditional and labels is not None:
        row["class_accuracy"] = ev.class_accuracy(logits, labels)
    if self.is_points:
      row["mode_coverage"] = ev.mode_coverage(samples, self.modes, self.std)
      row["off_mode_fraction"] = ev.off_mode_fraction(samples, self.modes, self.std)
    histogram = self.class_histogram(samples, logits)
    row["class_coverage"] = coverage.class_coverage(histogram, self.ref_histogram)
    row["class_tv"] = coverage.total_variation(histogram, self.ref_histogram)
    return {k: float(v) for k, v in row.items()}


class Evaluator:
  """The eval scorer of an in-memory source (sources/embedded.py): the source's eval
  conditions, the driver's noise, ReferenceScorer's columns.

  Also used alone (benchmarks/hd_table.py): evaluator.teacher(params, num_steps) and
  evaluator.student(params, num_steps, name) each return one row and keep the samples in
  last_samples, for grids.
  """

  def __init__(self, chain):
    self.chain = chain
    source = chain.source
    self.cfg = chain.config.eval
    self.reference_size = int(self.cfg.get("reference_size", 0))
    # A source whose images are another set's (digits with captions) names that set: its
    # classifier scores them.
    image_set = getattr(source, "image_set", source.name)
    self.scorer = ReferenceScorer(reference_subset(source.x, self.reference_size), image_set,
                                  source.data_dir, conditional=source.num_classes > 1)
    self.key = driver.eval_key(chain.config)
    self.conditions = source.eval_conditions(int(self.cfg.num_samples))
    self.last_samples = None

  def samples(self, sample_fn, params) -> np.ndarray:
    return generate(sample_fn, params, self.conditions, int(self.cfg.batch_size),
                    self.chain.source.shape, self.key, self.chain.mesh)

  def measure(self, sample_fn, params, files_prefix=None):
    """(metric columns, every sample); files_prefix is not used (nothing beyond the grid)."""
    del files_prefix
    samples = self.samples(sample_fn, params)
    self.last_samples = samples
    return self.scorer(samples, self.conditions), samples

  def save_grid(self, samples, path: str) -> None:
    self.chain.source.save_grid(samples, path)

  def teacher(self, params, num_steps: int, name: str = None) -> dict:
    name = name or f"teacher ({driver.steps_label(num_steps)})"
    return driver.measure_row(self, name, driver.teacher_nfe(self.chain, num_steps),
                              driver.teacher_sampler(self.chain, num_steps), params)[0]

  def student(self, params, num_steps: int, name: str) -> dict:
    return driver.measure_row(self, f"{name} ({driver.steps_label(num_steps)})", num_steps,
                              driver.student_sampler(self.chain, num_steps), params)[0]

  def describe(self) -> dict:
    """What every row was measured with, to store beside the numbers."""
    subset = (" (a fixed subset)" if self.scorer.reference_size < len(self.chain.source.x)
              else "")
    return {"feature_net": self.scorer.feature_name, "num_samples": int(self.cfg.num_samples),
            "reference": f"{self.chain.source.name} train split, "
                         f"{self.scorer.reference_size} examples{subset}",
            **self.scorer.info}
