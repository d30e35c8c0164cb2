"""Mode coverage of 2-D samples from a known mixture of Gaussians (data/toy2d.py).

A sample belongs to its nearest mode if it lies within `num_std` standard deviations of it
(3 std keeps 98.9% of a 2-D isotropic Gaussian's mass); otherwise it is off-mode. Then:
- mode_coverage: fraction of modes that received at least `min_share` of their fair share of the
  samples, i.e. at least min_share * n / K samples. Default 0.1: a mode hit by a handful of
  stragglers (fewer than a tenth of what it should get) counts as dropped, since a collapsed
  generator still leaks a few samples everywhere;
- off_mode_fraction: fraction of samples near no mode (blur between modes, outliers).
"""
from __future__ import annotations

import numpy as np


def assign_modes(samples, modes, std: float, num_std: float = 3.0) -> np.ndarray:
  """Index of each sample's mode, or -1 if farther than num_std * std from every mode.

  samples: (N, 2) (any D works); modes: (K, D). Returns int (N,).
  """
  x, m = np.asarray(samples, np.float64), np.asarray(modes, np.float64)
  d2 = np.sum((x[:, None, :] - m[None, :, :]) ** 2, axis=-1)  # (N, K): K is tiny.
  nearest = np.argmin(d2, axis=1)
  within = d2[np.arange(len(x)), nearest] <= (num_std * std) ** 2
  return np.where(within, nearest, -1)


def mode_counts(samples, modes, std: float, num_std: float = 3.0) -> np.ndarray:
  """Samples assigned to each mode: int (K,); off-mode samples are not counted."""
  a = assign_modes(samples, modes, std, num_std)
  return np.bincount(a[a >= 0], minlength=len(modes))


def mode_coverage(samples, modes, std: float, num_std: float = 3.0,
                  min_share: float = 0.1) -> float:
  """Fraction of modes with at least min_share * N / K of the N samples (see module doc)."""
  counts = mode_counts(samples, modes, std, num_std)
  needed = max(min_share * len(samples) / len(counts), 1.0)
  return float(np.mean(counts >= needed))


def off_mode_fraction(samples, modes, std: float, num_std: float = 3.0) -> float:
  """Fraction of samples farther than num_std * std from every mode."""
  return float(np.mean(assign_modes(samples, modes, std, num_std) < 0))
