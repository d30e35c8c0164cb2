"""2-D mixtures of Gaussians, the classic testbed for mode collapse.

- '8gaussians': 8 modes evenly spaced on a circle of radius 2 (neighbours 1.53 apart).
- '25gaussians': a 5 x 5 grid at {-2, -1, 0, 1, 2}^2 (neighbours 1 apart).
Every mode has an isotropic std of STD = 0.05, small against the spacing, so a sample near no
mode is unambiguous (evaluation.mode_coverage counts within 3 std). Each mode is a class: the label
is the mode index, so class-conditional generation works like on images.

Points are float32 (N, 2), not in [-1, 1]: per axis the data have std about 1.4, the same order as
the N(0, I) noise of the flow path. Sampling is a pure function of the seed or key.
"""
from __future__ import annotations

import numpy as np

NAMES = ("8gaussians", "25gaussians")
STD = 0.05
NUM_TRAIN = 20_000


def modes(name: str) -> np.ndarray:
  """The mode centres, float32 (K, 2); K = 8 or 25. Mode k is class k."""
  if name == "8gaussians":
    angles = 2.0 * np.pi * np.arange(8) / 8
    return (2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype(np.float32)
  if name == "25gaussians":
    grid = np.arange(-2.0, 3.0)
    gx, gy = np.meshgrid(grid, grid, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)
  raise ValueError(f"unknown toy 2-D data set {name!r}; choose one of {NAMES}")


def num_classes(name: str) -> int:
  return len(modes(name))


def _seed_of(key_or_seed) -> np.random.Generator:
  """A numpy generator from an int seed or a JAX PRNG key (typed or raw uint32)."""
  if isinstance(key_or_seed, (int, np.integer)):
    return np.random.default_rng(int(key_or_seed))
  import jax  # pylint: disable=g-import-not-at-top

  key = key_or_seed
  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  # The key's bits seed the generator, so a given key always gives the same points.
  return np.random.default_rng(np.asarray(key, dtype=np.uint32).ravel().tolist())


def sample(key_or_seed, n: int, name: str = "8gaussians", std: float = STD):
  """Draws n labelled points, deterministically.

  Labels are balanced: exactly n // K or n // K + 1 points a mode, in a random order.

  Args:
    key_or_seed: an int seed or a JAX PRNG key.
    n: number of points.
    name: '8gaussians' or '25gaussians'.
    std: per-axis std of every mode.
  Returns:
    x float32 (n, 2); y int32 (n,), the mode index of each point.
  """
  centres = modes(name)
  rng = _seed_of(key_or_seed)
  y = rng.permutation(np.arange(n) % len(centres)).astype(np.int32)
  x = centres[y] + std * rng.standard_normal((n, 2))
  return x.astype(np.float32), y


def load_toy2d(name: str, num_train: int = NUM_TRAIN, seed: int = 0):
  """The fixed finite training set: sample(seed, num_train, name); (x (N, 2), y (N,))."""
  return sample(seed, num_train, name)
