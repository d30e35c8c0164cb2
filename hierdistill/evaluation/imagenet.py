"""ImageNet 256 evaluation as the papers run it: FID, Inception Score, precision and recall of
50,000 samples against ADM's reference batch, with the Inception features computed in JAX.

The protocol of ADM's evaluator (guided-diffusion/evaluations), which DiT, SiT, DMD2, MeanFlow
and the HD paper report:
- reference: VIRTUAL_imagenet256_labeled.npz: arr_0 = 10,000 ImageNet training images (uint8,
  256x256, ADM centre crop); it also stores mu/sigma of their pool3 features, which FID uses
  when present (eval.use_stored_reference_stats). We also compute the reference features
  ourselves (precision/recall needs them) and report the FID against those statistics too,
  `FID_recomputed_reference`: a check of our Inception port on real data.
- samples: decoded by the VAE and stored as uint8 the way DiT/SiT's sample_ddp does
  (clip(127.5 x + 128, 0, 255), truncated), so the features see what a PNG would hold.
- features: the FID Inception (evaluation/inception.py, 'tf' preprocessing as ADM's TF graph).
- IS over splits of 5,000 samples with logits = pool3 @ W (no bias), precision/recall with
  k = 3 on pool3 (Kynkaanniemi et al.).
With random Inception weights (tests, runlocal) the columns are named FD-random-inception and
IS-random-inception: they are not FID and not IS.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import sharding as shard_lib
from hierdistill.evaluation import frechet
from hierdistill.evaluation import grids
from hierdistill.evaluation import inception as inception_lib
from hierdistill.evaluation.inception_score import inception_score
from hierdistill.evaluation.precision_recall import precision_recall
from hierdistill.models.vae import AutoencoderKL, unscale_latents


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] floats -> uint8 as DiT/SiT save samples: clip(127.5 x + 128, 0, 255), truncated."""
  return jnp.clip(127.5 * images + 128.0, 0.0, 255.0).astype(jnp.uint8)


def load_reference_batch(path: str, config_key: str = "config.eval.reference_batch"
                         ) -> Dict[str, np.ndarray]:
  """arr_0 (uint8 images) and, when stored, mu/sigma of ADM's reference npz."""
  if not path or not os.path.isfile(path):
    from hierdistill.convert.from_config import REFERENCE_PUBLISHED  # pylint: disable=g-import-not-at-top
    raise FileNotFoundError(f"{config_key}={path!r}: no such file; expected "
                            f"{REFERENCE_PUBLISHED}")
  with np.load(path) as npz:
    out = {"images": np.asarray(npz["arr_0"])}
    if "mu" in npz.files and "sigma" in npz.files:
      out["mu"], out["sigma"] = np.asarray(npz["mu"]), np.asarray(npz["sigma"])
  if out["images"].dtype != np.uint8 or out["images"].ndim != 4:
    raise ValueError(f"{config_key}={path!r}: arr_0 must be uint8 (N, H, W, 3) images, got "
                     f"{out['images'].dtype} {out['images'].shape}")
  return out


class ImageNetScorer:
  """Decodes latent samples, computes their Inception features, and scores them.

  vae, vae_params: the autoencoder (its scaling_factor undoes the latent scale).
  inception, inception_params: the FID Inception. random_inception: name columns accordingly.
  reference: load_reference_batch's dict. mesh: batches are split over its devices.
  """

  def __init__(self, *, vae: AutoencoderKL, vae_params, inception, inception_params,
               reference: Dict[str, np.ndarray], mesh, preprocessing: str = "tf",
               inception_size: int = inception_lib.INPUT_SIZE, batch_size: int = 64,
               random_inception: bool = False, use_stored_reference_stats: bool = True,
               is_split_size: int = 5000, pr_k: int = 3):
    self.vae, self.inception, self.mesh = vae, inception, mesh
    rep = shard_lib.replicated(mesh)
    self.vae_params = jax.device_put(vae_params, rep)
    self.inception_params = jax.device_put(inception_params, rep)
    # Rounded up to a multiple of the devices rather than refused (the extra rows are trimmed).
    self.batch_size = shard_lib.padded_batch_size(int(batch_size), mesh)
    self.random_inception = random_inception
    self.is_split_size, self.pr_k = int(is_split_size), int(pr_k)
    self.fd_name = "FD-random-inception" if random_inception else "FID"
    self.is_name = "IS-random-inception" if random_inception else "IS"
    self._feature_fn = inception_lib.make_feature_fn(inception, preprocessing, inception_size)
    self._features = jax.jit(
        lambda p, images: _pick(self._feature_fn(p, images)),
        in_shardings=(rep, shard_lib.batch_sharding(mesh)), out_shardings=rep)
    ref_pool, _ = self.image_features(reference["images"])
    self.reference_pool = ref_pool
    self.recomputed_stats = frechet.feature_statistics(ref_pool)
    self.stored_stats = None
    if use_stored_reference_stats and "mu" in reference and not random_inception:
      self.stored_stats = (reference["mu"], reference["sigma"])
    self.reference_size = len(ref_pool)
    self._decode_jit = None

  def image_features(self, images: np.ndarray):
    """(pool, logits_unbiased) float32 numpy of uint8 images, in batches over the mesh."""
    pools, logits = [], []
    n = len(images)
    for start in range(0, n, self.batch_size):
      chunk = np.asarray(images[start:start + self.batch_size])
      k = len(chunk)
      if k < self.batch_size:  # pad the last batch; trimmed below
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - k, 0)])
      local = _process_rows(chunk)
      out = self._features(self.inception_params, shard_lib.put_batch(local, self.mesh))
      pools.append(np.asarray(out[0])[:k])
      logits.append(np.asarray(out[1])[:k])
    return np.concatenate(pools), np.concatenate(logits)

  def _decode(self, vae_params, latents):
    """Scaled latents -> uint8 images, as a saved PNG would hold them."""
    images = self.vae.apply({"params": vae_params}, unscale_latents(self.vae, latents),
                            method=AutoencoderKL.decode)
    return to_uint8(images)

  def measure(self, latent_sample_fn: Callable, params, *, num_samples: int, latent_shape,
              num_classes: int, key, keep_images: int = 0, save_npz: Optional[str] = None
              ) -> tuple[Dict[str, float], np.ndarray]:
    """Generates num_samples with latent_sample_fn(params, noise, y) (labels cycle through the
    classes, noise folded from key by batch start, as the other eval rows), decodes and scores
    them. Only features (and the images asked for) leave the devices. Returns (row, the first
    keep_images uint8 images)."""
    rep = shard_lib.replicated(self.mesh)
    batch = shard_lib.batch_sharding(self.mesh)
    sample = jax.jit(latent_sample_fn, in_shardings=(None, batch, batch), out_shardings=batch)
    # Compiled once for all rows (only the samplers differ per row); the features reuse the
    # program that measured the reference batch.
    if self._decode_jit is None:
      self._decode_jit = jax.jit(self._decode, in_shardings=(rep, batch), out_shardings=batch)
    labels = np.arange(num_samples, dtype=np.int32) % num_classes
    pools, logits, kept, saved = [], [], [], []
    bs = self.batch_size
    for start in range(0, num_samples, bs):
      n = min(bs, num_samples - start)
      noise = jax.random.normal(jax.random.fold_in(key, start), (bs,) + tuple(latent_shape))
      y = np.resize(labels[start:start + n], bs)
      latents = sample(params, noise, jnp.asarray(y))
      images = self._decode_jit(self.vae_params, latents)
      pool, logit = self._features(self.inception_params, images)
      pools.append(np.asarray(pool)[:n])
      logits.append(np.asarray(logit)[:n])
      want_grid = sum(len(k) for k in kept) < keep_images
      if want_grid or save_npz:
        host = np.asarray(_gather(images))[:n]
        if want_grid:
          kept.append(host)
        if save_npz:
          saved.append(host)
    row = self.score(np.concatenate(pools), np.concatenate(logits))
    if save_npz and jax.process_index() == 0:
      os.makedirs(os.path.dirname(save_npz) or ".", exist_ok=True)
      # ADM's evaluator reads arr_0 (uint8 NHWC); arr_1 keeps the labels.
      np.savez(save_npz, arr_0=np.concatenate(saved), arr_1=labels)
    images = np.concatenate(kept)[:keep_images] if kept else np.zeros((0,), np.uint8)
    return row, images

  def score(self, pool: np.ndarray, logits: np.ndarray) -> Dict[str, float]:
    """The metric columns of a set of sample features."""
    mu, sigma = frechet.feature_statistics(pool)
    ref = self.stored_stats or self.recomputed_stats
    row = {self.fd_name: frechet.frechet_distance(*ref, mu, sigma)}
    if self.stored_stats is not None:
      row[f"{self.fd_name}_recomputed_reference"] = frechet.frechet_distance(
          *self.recomputed_stats, mu, sigma)
    splits = max(1, len(logits) // self.is_split_size)
    row[self.is_name] = inception_score(logits, splits=splits)[0]
    precision, recall = precision_recall(self.reference_pool, pool, k=self.pr_k)
    row["precision"], row["recall"] = precision, recall
    return {k: float(v) for k, v in row.items()}


def _pick(out):
  return out["pool"], out["logits_unbiased"]


def _process_rows(batch: np.ndarray) -> np.ndarray:
  """This process's contiguous slice of a global batch (what put_batch expects)."""
  p, n = jax.process_index(), jax.process_count()
  k = len(batch) // n
  return batch[p * k:(p + 1) * k]


def _gather(x):
  if jax.process_count() == 1:
    return jax.device_get(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(x, tiled=True)


def save_uint8_grid(images: np.ndarray, path: str) -> None:
  """uint8 images as a PNG grid (never JPEG: PITFALLS.md)."""
  if len(images):
    grids.save_image_grid(np.asarray(images, np.float32) / 127.5 - 1.0, path)
