"""The Frechet distance between Gaussians fitted to two sets of features.

FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).

Computed in float64 numpy, without scipy: S1^1/2 S2 S1^1/2 is symmetric PSD, so both square roots
come from eigh, where scipy.linalg.sqrtm of the non-symmetric S1 S2 returns complex parts that
must be thrown away. Rounding can leave tiny negative eigenvalues; they are clipped to 0.

Name the number for its feature net: with Inception-v3 pool3 features it is FID; with the digits
classifier of feature_net.py it is "FD-digits", never FID.
"""
from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features (N, D), N >= 2: float64 (D,), (D, D).

  The covariance is the unbiased one (divides by N - 1), as in the reference FID code.
  """
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix by eigh (negative rounding noise clipped)."""
  w, v = np.linalg.eigh(0.5 * (s + s.T))
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

  mu: (D,); sigma: (D, D) symmetric PSD. Returns a float >= 0 (clipped: rounding can make it
  a tiny negative number for identical statistics).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                     f"{s2.shape}")
  s1_half = _psd_sqrt(s1)
  m = s1_half @ s2 @ s1_half
  # tr(M^1/2) = sum of sqrt of M's eigenvalues; only eigenvalues are needed.
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)))
  fd = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
  return float(max(fd, 0.0))


def frechet_distance_from_features(features1, features2) -> float:
  """frechet_distance of the statistics of two feature sets (N1, D), (N2, D)."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
