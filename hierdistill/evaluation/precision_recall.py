"""Improved precision and recall (Kynkaanniemi et al. 2019) from k-NN manifolds of features.

Each set defines a manifold: the union of balls around its points, the radius of a point being the
distance to its k-th nearest neighbour within its own set (itself excluded).
- precision = fraction of fake points inside the real manifold (how many samples are realistic);
- recall = fraction of real points inside the fake manifold (how much of the data is covered).
Precision drops with artefacts, recall with mode collapse. k = 3 as in the paper.

Pairwise distances are computed in blocks of `block_size` rows by `block_size` columns within one
jitted program (lax.map over row blocks, lax.scan over column blocks), so memory is
O(block_size^2 + N D) and 50,000 x 50,000 fits an accelerator; on a CPU it runs in seconds for a
few thousand points. Distances use |a|^2 + |b|^2 - 2 a.b in float32 on features centred on the
real mean (which keeps the cancellation small).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _blocks(x: np.ndarray, block: int):
  """Pads (N, D) to a multiple of block rows: (num_blocks, block, D) and a validity mask."""
  n = len(x)
  nb = -(-n // block)
  pad = nb * block - n
  xb = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]).reshape(nb, block, -1)
  valid = (np.arange(nb * block) < n).reshape(nb, block)
  return jnp.asarray(xb), jnp.asarray(valid)


def _sq_dists(a, b):
  """Squared distances (Ra, Rb) between rows of a (Ra, D) and b (Rb, D), clipped at 0."""
  d2 = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :]
        - 2.0 * jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST))
  return jnp.maximum(d2, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_nn_sq_radii(xb, valid, k: int):
  """Squared distance of every point to its k-th nearest neighbour in the same set.

  xb: (nb, block, D); valid: (nb, block). Returns (nb, block); the point itself (distance ~0)
  is among the k + 1 smallest, so the k-th neighbour excluding it is the (k+1)-th smallest.
  """
  def row_block(rows):
    def col_block(best, cols):
      xc, vc = cols
      d2 = jnp.where(vc[None, :], _sq_dists(rows, xc), jnp.inf)
      # Keep a running k + 1 smallest per row: never materialise a full row of distances.
      merged = jnp.concatenate([best, d2], axis=1)
      return -jax.lax.top_k(-merged, k + 1)[0], None

    init = jnp.full((rows.shape[0], k + 1), jnp.inf, rows.dtype)
    best, _ = jax.lax.scan(col_block, init, (xb, valid))
    return best[:, k]

  return jax.lax.map(row_block, xb)


@jax.jit
def _inside_manifold(qb, refb, ref_radii_sq):
  """For each query point, whether it lies within the radius of some reference point.

  qb: (nq, block, D); refb: (nr, block, D); ref_radii_sq: (nr, block), -inf for padding.
  Returns bool (nq, block).
  """
  def row_block(rows):
    def col_block(inside, cols):
      xc, rc = cols
      return inside | jnp.any(_sq_dists(rows, xc) <= rc[None, :], axis=1), None

    init = jnp.zeros(rows.shape[0], bool)
    inside, _ = jax.lax.scan(col_block, init, (refb, ref_radii_sq))
    return inside

  return jax.lax.map(row_block, qb)


def _manifold(x: np.ndarray, k: int, block: int):
  """Blocks of x and their squared k-NN radii (-inf on padding rows, so they contain nothing)."""
  if len(x) <= k:
    raise ValueError(f"need more than k={k} points to find k-th neighbours, got {len(x)}")
  xb, valid = _blocks(x, block)
  radii = _kth_nn_sq_radii(xb, valid, k)
  return xb, valid, jnp.where(valid, radii, -jnp.inf)


def precision_recall(real_features, fake_features, k: int = 3,
                     block_size: int = 4096) -> tuple[float, float]:
  """Improved precision and recall of fake features against real ones.

  Args:
    real_features: (N_real, D); fake_features: (N_fake, D). Compare only numbers made with the
      same N's, the same k and the same feature net.
    k: which nearest neighbour sets a point's radius (3 in the paper).
    block_size: rows and columns of one block of the distance matrix; lower it if memory is
      short (memory ~ 4 block_size^2 bytes a few times over).
  Returns:
    (precision, recall), floats in [0, 1].
  """
  real = np.asarray(real_features, np.float32)
  fake = np.asarray(fake_features, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"need (N, D) features of equal D, got {real.shape} and {fake.shape}")
  # Translation changes no distance but shrinks |a|^2 + |b|^2 - 2 a.b cancellation.
  centre = real.mean(axis=0, keepdims=True)
  real, fake = real - centre, fake - centre
  # No bigger blocks than the sets themselves (padded to a multiple of 8 rows).
  block = int(min(block_size, -(-max(len(real), len(fake)) // 8) * 8))
  real_b, real_valid, real_r = _manifold(real, k, block)
  fake_b, fake_valid, fake_r = _manifold(fake, k, block)
  fake_in_real = _inside_manifold(fake_b, real_b, real_r)
  real_in_fake = _inside_manifold(real_b, fake_b, fake_r)
  precision = float(jnp.sum(fake_in_real & fake_valid) / len(fake))
  recall = float(jnp.sum(real_in_fake & real_valid) / len(real))
  return precision, recall
