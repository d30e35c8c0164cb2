"""Encoding jobs: a frozen network applied to a data set once, written as the shards that a data
reader reads (ImageNet's VAE latents: data/imagenet_latents.py describes the format).

data/ only reads shards and knows no network; the VAE and the mesh enter here. The launchers
(launch/extract_latents.py, launch/extract_t2i_latents.py) share `run_launcher`: the output
folder is named and tried for writing before any network loads, and errors are one line.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
from typing import Any, Callable, Dict, Optional

import numpy as np

from hierdistill.data import imagenet_latents as il


def make_encode_fn(vae, mesh, flips: bool):
  """jit (params, uint8 images (B, S, S, 3)) -> (mean, std) float16, (2B, ...) with flips (the
  flipped images second), the batch split over the mesh's devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from hierdistill.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top

  def encode(params, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0  # DiT/SiT's Normalize(0.5, 0.5) of [0, 1]
    if flips:
      x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
    mean, logvar = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    return mean.astype(jnp.float16), jnp.exp(0.5 * logvar).astype(jnp.float16)

  batch = NamedSharding(mesh, P(mesh.axis_names))
  return jax.jit(encode, in_shardings=(NamedSharding(mesh, P()), batch),
                 out_shardings=(batch, batch))


def extract(*, read_split, num_examples: int, out_dir: str, vae, vae_params, mesh,
            image_size: int, flips: bool, num_shards: int, batch_size: int,
            process_index: int = 0, process_count: int = 1, info: Optional[Dict] = None,
            log=print, workers: int = 8) -> Dict[str, Any]:
  """Writes this process's shards (k = process_index mod process_count) of the latents.

  read_split(start, end) -> iterator of (image uint8 (H, W, 3), label) for examples
  [start, end) of the split, in order. Shards whose file exists are skipped, so an interrupted
  extraction resumes by shard. Each process encodes on the devices of `mesh` (its own), so
  processes never wait for each other. Process 0 writes info.json first.
  Returns {'written': shards written here, 'skipped': shards found complete}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if num_shards % process_count:
    raise ValueError(f"config.data.num_shards={num_shards} must be a multiple of the "
                     f"{process_count} processes")
  n_dev = mesh.devices.size
  if batch_size % n_dev:
    raise ValueError(f"config.data.extract_batch_size={batch_size} must be a multiple of the "
                     f"{n_dev} devices of a process")
  os.makedirs(out_dir, exist_ok=True)
  h = image_size // vae.downsampling_factor
  if process_index == 0:
    il.write_info(out_dir, {
        **(info or {}), "num_examples": num_examples, "num_shards": num_shards,
        "num_classes": il.NUM_CLASSES, "latent_shape": [h, h, vae.latent_channels],
        "image_size": image_size, "crop": "adm_center_crop", "flips": flips,
        "scaling_factor_not_applied": vae.scaling_factor})
  encode = make_encode_fn(vae, mesh, flips)
  params = jax.device_put(vae_params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  written = 0
  todo, skipped = il.shards_to_write(out_dir, num_examples, num_shards, process_index,
                                     process_count)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
  for k, start, end, path in todo:
    writer = il.ShardWriter(path)
    examples = read_split(start, end)
    while True:
      chunk = [ex for _, ex in zip(range(batch_size), examples)]
      if not chunk:
        break
      images = list(pool.map(lambda ex: il.adm_center_crop(ex[0], image_size), chunk))
      labels = [int(ex[1]) for ex in chunk]
      n = len(images)
      batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)  # padded last batch
      batch[:n] = np.stack(images)
      mean, std = (np.asarray(a) for a in encode(params, batch))
      for i in range(n):
        if flips:
          writer.write(il.encode_record(mean[i], std[i], labels[i], mean[batch_size + i],
                                     std[batch_size + i]))
        else:
          writer.write(il.encode_record(mean[i], std[i], labels[i]))
    if writer.count != end - start:
      raise RuntimeError(f"shard {k}: read {writer.count} examples, expected {end - start}")
    writer.close()
    written += 1
    log(f"[extract] shard {k + 1}/{num_shards}: {end - start} examples -> {path}")
  pool.shutdown()
  return {"written": written, "skipped": skipped}


def _tfds_source(data_config, split: str):
  """(read_split(start, end), num_examples) of imagenet2012 through tfds; prepares it from the
  manual download dir first if needed. Missing files name config.data.manual_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  mock = int(data_config.get("mock_num_examples", 0))
  data_dir = data_config.data_dir or os.environ.get("TFDS_DATA_DIR") or None
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if mock:
    num_examples = mock
  else:
    if not builder.is_prepared():
      manual = data_config.manual_dir
      tar = os.path.join(manual or "", "ILSVRC2012_img_train.tar")
      if not manual or not os.path.isfile(tar):
        raise FileNotFoundError(
            f"config.data.manual_dir={manual!r}: no ILSVRC2012_img_train.tar there, and "
            f"imagenet2012 is not prepared under config.data.data_dir={data_config.data_dir!r};"
            " expected the ILSVRC2012 archives from image-net.org (tfds manual download)")
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual))
    num_examples = builder.info.splits[split].num_examples

  def read_split(start: int, end: int):
    if mock:  # mock_data ignores slicing: take the examples by position
      ds = builder.as_dataset(split=split, shuffle_files=False).skip(start).take(end - start)
    else:
      ds = builder.as_dataset(split=f"{split}[{start}:{end}]", shuffle_files=False)
    for ex in tfds.as_numpy(ds):
      yield ex["image"], ex["label"]

  return read_split, num_examples


def extract_from_config(config, out_dir: str, *, mesh=None, log=print,
                        reference_size: int = 0) -> Dict[str, Any]:
  """Extracts config.data's imagenet2012 split into `out_dir` with the config's VAE.

  With data.mock_num_examples > 0 the source is tfds.testing.mock_data (random images) and
  `reference_size` of the cropped images are also written as a reference batch
  (out_dir/reference.npz, ADM's npz format).
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from hierdistill.convert import from_config  # pylint: disable=g-import-not-at-top
  from hierdistill import sharding as shard_lib  # pylint: disable=g-import-not-at-top
  d = config.data
  mock = int(d.get("mock_num_examples", 0))
  vae, vae_params = from_config.load_vae(config)
  # Each process encodes on its own devices: extraction needs no cross-host collectives.
  mesh = mesh or shard_lib.make_mesh(-1, 1, devices=jax.local_devices())
  ctx = contextlib.nullcontext()
  if mock:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    ctx = tfds.testing.mock_data(num_examples=mock, policy=tfds.testing.MockPolicy.USE_CODE)
  with ctx:
    read_split, n = _tfds_source(d, "train")
    info = {"source": "mock imagenet2012 (tfds.testing.mock_data)" if mock else
                      "imagenet2012 (tfds), train split",
            "vae": {"path": config.vae.path, "variant": config.vae.variant,
                    "random_init": bool(config.vae.random_init)}}
    result = extract(read_split=read_split, num_examples=n, out_dir=out_dir, vae=vae,
                     vae_params=vae_params, mesh=mesh, image_size=int(d.image_size),
                     flips=bool(d.flip), num_shards=int(d.num_shards),
                     batch_size=int(d.extract_batch_size),
                     process_index=jax.process_index(), process_count=jax.process_count(),
                     info=info, log=log)
    if mock and reference_size and jax.process_index() == 0:
      examples = list(zip(range(reference_size), read_split(0, n)))
      images = np.stack([il.adm_center_crop(ex[0], int(d.image_size)) for _, ex in examples])
      labels = np.asarray([int(ex[1]) for _, ex in examples])
      il.write_reference_batch(os.path.join(out_dir, "reference.npz"), images, labels)
  return result


def run_launcher(config, extract_fn: Callable[[Any, str], Dict[str, int]]) -> None:
  """The body of an extraction launcher: extract_fn(config, config.data.latents_dir) after the
  folder is named and found writable (tried, as a workdir is); exits 2 with one line on an
  error of the user's."""
  from hierdistill.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  from hierdistill.workdir import check_writable  # pylint: disable=g-import-not-at-top
  latents_dir = config.data.latents_dir

  def fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

  if not latents_dir:
    fail("config.data.latents_dir='': name the folder to write the shards to "
         "(--config.data.latents_dir=DIR)")
  try:
    # Before the networks load and the images are read: hours of encoding must not end in a
    # folder that refuses the first shard.
    check_writable(latents_dir, what="config.data.latents_dir", flag="--config.data.latents_dir")
    result = extract_fn(config, latents_dir)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    fail(str(e))
  print(f"[extract] done: {result['written']} shards written, {result['skipped']} found "
        f"complete, in {latents_dir}", flush=True)
