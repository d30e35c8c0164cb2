"""Per-class coverage: does a generator draw every class as often as the data holds it?

Mode dropping is what DMD from a poor start is said to do. Class labels hide it (each label asks
for its class), so it is measured on samples of an unconditional generator: a classifier labels
the samples and the reference data alike (the set's own classifier for images, the nearest mode
for 2-D mixtures), and the two label histograms are compared. The classifier's own errors enter
both histograms, so a perfect generator scores as the data does.
- class_histogram: share of the labelled samples given each of the K labels (sums to 1);
- class_coverage: fraction of classes whose share in the samples reaches min_share of their
  share in the data. Default 0.5: a class drawn at half its rate or less counts as dropped (at
  1,000 samples and 10 classes a kept class falls below that by sampling noise about once in
  10^6); modes.mode_coverage keeps a looser rule (0.1 of a fair share) for whole modes lost;
- class_tv: the total variation distance 0.5 * sum_k |p_k - q_k|, 0 when the proportions
  match, 1 when the two histograms are disjoint: the share of samples in the wrong classes.
"""
from __future__ import annotations

import numpy as np


def class_histogram(labels, num_classes: int) -> np.ndarray:
  """Share of each label 0..K-1 among `labels` (int (N,)); negative labels (unassigned, e.g.
  off-mode points) are left out. All zeros when nothing is labelled."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be (N,), got shape {labels.shape}")
  counts = np.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes]
  total = counts.sum()
  return counts / total if total else np.zeros(num_classes)


def class_coverage(sample_hist, data_hist, min_share: float = 0.5) -> float:
  """Fraction of the data's classes (share > 0) the samples draw at >= min_share of its rate."""
  p, q = np.asarray(sample_hist, np.float64), np.asarray(data_hist, np.float64)
  if p.shape != q.shape:
    raise ValueError(f"histograms of different lengths: {p.shape} and {q.shape}")
  present = q > 0
  return float(np.mean(p[present] >= min_share * q[present])) if present.any() else 0.0


def total_variation(sample_hist, data_hist) -> float:
  """0.5 * sum |p - q|: 0 for the same proportions, 1 for disjoint histograms."""
  p, q = np.asarray(sample_hist, np.float64), np.asarray(data_hist, np.float64)
  if p.shape != q.shape:
    raise ValueError(f"histograms of different lengths: {p.shape} and {q.shape}")
  return float(0.5 * np.abs(p - q).sum())
