"""ImageNet 256 as SD-VAE latents (config.data.name 'imagenet256_latents'), docs/imagenet.md:

  opening        check every file the run will read (convert/from_config.py) before anything
                 compiles; open the latents (runlocal: extract mock ImageNet first)
  make_pipeline  data/imagenet_latents.LatentPipeline: shards read per process
  save_grid      decode latents with the VAE before drawing
  make_scorer    ImageNetEval: FID/IS/precision/recall with the FID Inception against ADM's
                 reference batch (evaluation/imagenet.py)
The published teacher (config.teacher.init_checkpoint=SiT-XL-2-256x256.pt) is imported by the
chain itself (pipeline.Chain.teacher_params), as for any experiment.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import conditions as cond_lib
from hierdistill import encoding
from hierdistill import sharding as shard_lib
from hierdistill.config_checks import ConfigError
from hierdistill.convert import from_config
from hierdistill.data import imagenet_latents
from hierdistill.evaluation import driver
from hierdistill.evaluation import grids
from hierdistill.evaluation import imagenet as ev_imagenet
from hierdistill.models.vae import AutoencoderKL, unscale_latents
from hierdistill.sources.base import DataSource

MOCK_LATENTS = "mock_latents"


def latents_dir_of(config, workdir: str) -> str:
  """config.data.latents_dir; for mock data with none set, <workdir>/mock_latents."""
  if config.data.latents_dir:
    return config.data.latents_dir
  if config.data.get("mock_num_examples", 0):
    return os.path.join(workdir, MOCK_LATENTS)
  return ""


def reference_batch_of(config, workdir: str) -> str:
  """config.eval.reference_batch; for mock data with none set, the one extracted beside the
  mock latents."""
  if config.eval.reference_batch:
    return config.eval.reference_batch
  if config.data.get("mock_num_examples", 0):
    return os.path.join(latents_dir_of(config, workdir), "reference.npz")
  return ""


class ImageNetSource(DataSource):
  """ImageNet latents, class-conditional (see the module docstring)."""

  def __init__(self, config, workdir: str, mesh):
    super().__init__(config, workdir, mesh)
    self.dataset = self._open()
    self.name = self.dataset.name
    self.shape = tuple(self.dataset.shape)
    self.num_classes = self.dataset.num_classes
    self.conditions = cond_lib.Labels(self.num_classes)

  def _open(self) -> imagenet_latents.LatentDataset:
    """The latents' metadata (nothing is read into memory), after checking every file."""
    config = self.config
    from_config.check_files(config)  # one line naming the key, before anything compiles
    latents_dir = latents_dir_of(config, self.workdir)
    if config.data.get("mock_num_examples", 0) and not os.path.isfile(
        os.path.join(latents_dir, imagenet_latents.INFO_FILE)):
      print(f"[data] mock ImageNet -> latents in {latents_dir}", flush=True)
      encoding.extract_from_config(
          config, latents_dir, reference_size=int(config.data.mock_num_examples))
    try:
      return imagenet_latents.open_latents(latents_dir)
    except FileNotFoundError as e:
      raise ConfigError(str(e)) from None

  def make_pipeline(self, global_batch_size: int, seed: int):
    scale, shift = from_config.latent_affine(self.config)
    return imagenet_latents.LatentPipeline(
        self.dataset, global_batch_size, seed, scaling_factor=scale, latent_shift=shift,
        sampling=self.config.data.latent_sampling, flip=bool(self.config.data.flip),
        process_index=jax.process_index(), process_count=jax.process_count())

  @functools.cached_property
  def vae(self):
    """(AutoencoderKL, params replicated over the mesh), loaded on first use."""
    model, params = from_config.load_vae(self.config)
    return model, jax.device_put(params, shard_lib.replicated(self.mesh))

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """Scaled latents -> images in [-1, 1] (host numpy), in VAE batches."""
    model, params = self.vae
    fn = jax.jit(lambda p, z: model.apply({"params": p}, unscale_latents(model, z),
                                          method=AutoencoderKL.decode))
    bs = int(self.config.vae.batch_size)
    return np.concatenate([np.asarray(fn(params, jnp.asarray(latents[i:i + bs])))
                           for i in range(0, len(latents), bs)])

  def save_grid(self, samples, path: str) -> None:
    """Decoded by the VAE, tiled in rows; the labels cycle along each row."""
    grids.save_image_grid(np.clip(self.decode(np.asarray(samples)), -1.0, 1.0), path)

  def make_scorer(self, chain):
    return ImageNetEval(chain)


class ImageNetEval:
  """The eval driver's scorer for ImageNet: samples decoded by the VAE and scored with the
  FID Inception against ADM's reference batch (evaluation/imagenet.ImageNetScorer). Only
  features, and the images a grid or eval.save_npz asks for, leave the devices."""

  def __init__(self, chain):
    self.chain = chain
    config = chain.config
    self.cfg = config.eval
    vae, vae_params = chain.source.vae
    inception, inception_params = from_config.load_inception(config)
    self.reference_path = reference_batch_of(config, chain.workdir)
    self.scorer = ev_imagenet.ImageNetScorer(
        vae=vae, vae_params=vae_params, inception=inception, inception_params=inception_params,
        reference=ev_imagenet.load_reference_batch(self.reference_path), mesh=chain.mesh,
        preprocessing=self.cfg.inception_preprocessing,
        inception_size=int(self.cfg.inception_size), batch_size=int(self.cfg.batch_size),
        random_inception=bool(self.cfg.random_inception),
        use_stored_reference_stats=bool(self.cfg.use_stored_reference_stats),
        is_split_size=int(self.cfg.is_split_size), pr_k=int(self.cfg.pr_k))
    self.key = driver.eval_key(config)

  def measure(self, sample_fn, params, files_prefix=None):
    """(metric columns, the first sample.grid_size images as uint8); with eval.save_npz, every
    sample is also written to <files_prefix>.npz as ADM's evaluator reads it."""
    config = self.chain.config
    npz = f"{files_prefix}.npz" if self.cfg.save_npz and files_prefix else None
    return self.scorer.measure(
        sample_fn, params, num_samples=int(self.cfg.num_samples),
        latent_shape=self.chain.source.shape, num_classes=config.model.num_classes,
        key=self.key, keep_images=int(config.sample.grid_size), save_npz=npz)

  def save_grid(self, images: np.ndarray, path: str) -> None:
    ev_imagenet.save_uint8_grid(images, path)

  def describe(self) -> dict:
    config, cfg, scorer = self.chain.config, self.cfg, self.scorer
    return {
        "feature_net": ("random-width Inception (NOT FID)" if cfg.random_inception else
                        "FID Inception-v3 (pt_inception-2015-12-05), "
                        f"{cfg.inception_preprocessing} preprocessing"),
        "num_samples": int(cfg.num_samples),
        "reference": f"{self.reference_path} ({scorer.reference_size} images"
                     f"{', stored mu/sigma' if scorer.stored_stats is not None else ''})",
        "vae": ("random weights (tests; not SD-VAE)" if config.vae.random_init
                else f"SD-VAE {config.vae.variant}: {config.vae.path}"
                if config.vae.get("kind", "sd") == "sd"
                else f"{config.vae.variant}: {config.vae.path}, latent statistics "
                     f"{config.vae.stats_path}"),
        "sample_encoding": "uint8 clip(127.5 x + 128), as DiT/SiT save PNGs"}

