"""ImageNet as SD-VAE latents in array_record shards: the format launch/extract_latents.py writes
(through hierdistill/encoding.py, which applies the VAE) and the training input that reads it.

Layout of a latents dir:
  info.json                          what made the latents (VAE, image size, crop, flips, counts)
  train-{k:05d}-of-{n:05d}.array_record
Each record is a msgpack map (flax.serialization): mean, std (float16, (h, w, 4): the VAE
posterior of the centre-cropped image, unscaled), label (int), and with flips stored also
flip_mean, flip_std (the same for the horizontally flipped image). Storing the posterior rather
than one draw keeps DiT/SiT's training exactly: they draw a fresh latent mean + std e every time
an image is seen, and flip images at random.

The training input (`LatentPipeline`) has the interface of data.InMemoryPipeline: batch(step)
-> {'x': (B / P, h, w, 4) float32 latents * scaling_factor, 'c': int32 labels}. The order of examples
is InMemoryPipeline's (epoch permutations of all N records from the seed), so the iterator
state is the step and a resumed run reads the batches an uninterrupted one would have. Each
process reads only its rows of each global batch, by random access into the shards (a record is
~16 KB; array_record reads it without touching the rest of the file), and the draws (flip,
posterior noise) are made for the global batch from (seed, step), so they do not depend on the
number of processes either.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
from flax import serialization

from hierdistill.data.pipeline import InMemoryPipeline

NAME = "imagenet256_latents"
INFO_FILE = "info.json"
NUM_CLASSES = 1000
FORMAT_VERSION = 1


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_record(mean: np.ndarray, std: np.ndarray, label: int,
                  flip_mean: Optional[np.ndarray] = None,
                  flip_std: Optional[np.ndarray] = None) -> bytes:
  rec = {"mean": np.asarray(mean, np.float16), "std": np.asarray(std, np.float16),
         "label": int(label)}
  if flip_mean is not None:
    rec["flip_mean"] = np.asarray(flip_mean, np.float16)
    rec["flip_std"] = np.asarray(flip_std, np.float16)
  return serialization.msgpack_serialize(rec)


def decode_record(data: bytes) -> Dict[str, Any]:
  return serialization.msgpack_restore(data)


class ShardWriter:
  """Writes records to one array_record file (group_size 1: every record randomly readable)."""

  def __init__(self, path: str):
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.path = path
    self._tmp = path + ".tmp"
    self._writer = ArrayRecordWriter(self._tmp, "group_size:1")
    self.count = 0

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.count += 1

  def close(self) -> None:
    # Written under a temporary name and renamed when complete: a crashed extraction never
    # leaves a shard that looks finished.
    self._writer.close()
    os.replace(self._tmp, self.path)


def write_info(latents_dir: str, info: Dict[str, Any]) -> None:
  with open(os.path.join(latents_dir, INFO_FILE), "w") as f:
    json.dump({"format_version": FORMAT_VERSION, **info}, f, indent=2)


def read_info(latents_dir: str, config_key: str = "config.data.latents_dir") -> Dict[str, Any]:
  path = os.path.join(latents_dir or "", INFO_FILE)
  if not latents_dir or not os.path.isfile(path):
    raise FileNotFoundError(
        f"{config_key}={latents_dir!r}: no {INFO_FILE} there; expected the latents that "
        "launch/extract_latents.py writes from imagenet2012 (tfds, manual download of "
        "ILSVRC2012_img_train.tar from image-net.org) (docs/imagenet.md)")
  with open(path) as f:
    return json.load(f)


def shard_paths(latents_dir: str, split: str = "train") -> List[str]:
  return sorted(glob.glob(os.path.join(latents_dir, f"{split}-*-of-*.array_record")))


@dataclasses.dataclass(frozen=True)
class LatentDataset:
  """What the chain needs to know of the latents without reading them (no x in memory)."""
  name: str
  num_examples: int
  num_classes: int
  shape: tuple
  info: Dict[str, Any]
  paths: tuple

  def __len__(self) -> int:
    return self.num_examples


def open_latents(latents_dir: str, split: str = "train",
                 config_key: str = "config.data.latents_dir") -> LatentDataset:
  """The LatentDataset of a latents dir; missing files raise FileNotFoundError naming the key."""
  info = read_info(latents_dir, config_key)
  paths = shard_paths(latents_dir, split)
  expected = int(info["num_shards"])
  if len(paths) != expected:
    raise FileNotFoundError(
        f"{config_key}={latents_dir!r}: {len(paths)} of the {expected} {split} shards are there "
        "(an extraction did not finish: rerun launch/extract_latents.py, it skips whole shards)")
  return LatentDataset(NAME, int(info["num_examples"]), int(info.get("num_classes", NUM_CLASSES)),
                       tuple(info["latent_shape"]), info, tuple(paths))


class LatentPipeline:
  """Batches of scaled VAE latents and labels by step, read from array_record shards.

  Args:
    dataset: from open_latents.
    global_batch_size, seed, process_index, process_count: as InMemoryPipeline.
    scaling_factor, latent_shift: the model's x = scaling_factor * latent + latent_shift, scalars
      (SD-VAE: 0.18215 and 0) or per-channel (C,) arrays (VA-VAE's statistics:
      models/vae.latent_affine).
    sampling: 'sample' (mean + std e, DiT/SiT's training) or 'mean'.
    flip: pick the flipped image's latents with probability 1/2 (needs stored flips).
    prefetch: batches read ahead in a background thread by iterate().
  """

  def __init__(self, dataset: LatentDataset, global_batch_size: int, seed: int, *,
               scaling_factor, latent_shift=0.0, sampling: str = "sample", flip: bool = True,
               process_index: int = 0, process_count: int = 1, prefetch: int = 2):
    from array_record.python.array_record_data_source import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
    if sampling not in ("sample", "mean"):
      raise ValueError(f"config.data.latent_sampling={sampling!r}; choose 'sample' or 'mean'")
    if flip and not dataset.info.get("flips", False):
      raise ValueError("config.data.flip=True but the latents were extracted without flips "
                       "(info.json 'flips': false): set --config.data.flip=False or re-extract "
                       "with flips")
    self.dataset = dataset
    self.source = ArrayRecordDataSource(list(dataset.paths))
    if len(self.source) != dataset.num_examples:
      raise ValueError(f"the shards hold {len(self.source)} records but info.json says "
                       f"{dataset.num_examples}")
    n = dataset.num_examples
    # The order of examples is InMemoryPipeline's, over record ids.
    self._order = InMemoryPipeline(np.arange(n), np.zeros(n, np.int32), global_batch_size, seed,
                                   process_index, process_count)
    self.global_batch_size = global_batch_size
    self.local_batch_size = self._order.local_batch_size
    self.seed, self.scaling_factor, self.sampling, self.flip = seed, scaling_factor, sampling, flip
    self.latent_shift = latent_shift
    self.process_index, self.process_count = process_index, process_count
    self.prefetch = prefetch
    # Shape-only stand-in for the loop's `pipeline.images.shape[1:]` (no data behind it).
    self.images = np.broadcast_to(np.zeros((), np.float32), (n,) + tuple(dataset.shape))

  @property
  def num_examples(self) -> int:
    return self.dataset.num_examples

  @property
  def example_shape(self) -> tuple:
    return tuple(self.dataset.shape)

  def global_indices(self, step: int) -> np.ndarray:
    return self._order.global_indices(step)

  def local_indices(self, step: int) -> np.ndarray:
    return self._order.local_indices(step)

  def _draws(self, step: int):
    """Flip coins and posterior noise for the global batch, then this process's rows."""
    rng = np.random.default_rng([self.seed, step, 0x1A7E])
    b = self.global_batch_size
    flips = rng.random(b) < 0.5
    noise = rng.standard_normal((b,) + self.example_shape, dtype=np.float32)
    start = self.process_index * self.local_batch_size
    sl = slice(start, start + self.local_batch_size)
    return flips[sl], noise[sl]

  def batch(self, step: int) -> Dict[str, np.ndarray]:
    idx = self.local_indices(step)
    records = self.source.__getitems__([int(i) for i in idx])
    flips, noise = self._draws(step)
    xs, ys = [], []
    for rec, flipped, e in zip(records, flips, noise):
      rec = decode_record(rec)
      pre = "flip_" if (self.flip and flipped) else ""
      mean = np.asarray(rec[pre + "mean"], np.float32)
      if self.sampling == "sample":
        mean = mean + np.asarray(rec[pre + "std"], np.float32) * e
      xs.append(mean)
      ys.append(rec["label"])
    x = self.scaling_factor * np.stack(xs) + self.latent_shift
    return {"x": x.astype(np.float32), "c": np.asarray(ys, np.int32)}

  def __iter__(self):
    return self.iterate(0)

  def iterate(self, start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    """Endless batches from start_step on, `prefetch` steps read ahead in a thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending = [pool.submit(self.batch, s) for s in range(start_step,
                                                            start_step + max(self.prefetch, 1))]
      step = start_step + len(pending)
      while True:
        yield pending.pop(0).result()
        pending.append(pool.submit(self.batch, step))
        step += 1


def read_all(dataset: LatentDataset, limit: Optional[int] = None) -> Dict[str, np.ndarray]:
  """The first `limit` records as arrays (tests and small reference sets)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
  source = ArrayRecordDataSource(list(dataset.paths))
  n = len(source) if limit is None else min(limit, len(source))
  recs = [decode_record(r) for r in source.__getitems__(list(range(n)))]
  out = {k: np.stack([np.asarray(r[k]) for r in recs]) for k in recs[0] if k != "label"}
  out["label"] = np.asarray([r["label"] for r in recs], np.int32)
  return out


# ---------------------------------------------------------------------------------------------
# The pieces of extraction that need no network (encoding.py applies the VAE and writes shards):
# the crop, the split of the examples into shards, the reference batch.


def adm_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's preprocessing of ImageNet (used by DiT and SiT): halve with a box filter while the
  short side is at least 2 * size, resize the short side to `size` with bicubic (PIL), then cut
  the centre size x size. image: (H, W, 3) uint8. Returns (size, size, 3) uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(np.asarray(image, np.uint8))
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil.convert("RGB"))
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def shard_ranges(num_examples: int, num_shards: int) -> List[tuple]:
  """[start, end) of each shard: contiguous, sizes differ by at most one."""
  return [(k * num_examples // num_shards, (k + 1) * num_examples // num_shards)
          for k in range(num_shards)]


def shards_to_write(out_dir: str, num_examples: int, num_shards: int, process_index: int,
                    process_count: int) -> tuple:
  """([(k, start, end, path)] of the shards this process writes (k = process_index mod
  process_count) and whose file does not exist yet, how many of its shards exist already):
  an interrupted extraction resumes by shard, and processes never write the same file."""
  todo, skipped = [], 0
  for k, (start, end) in enumerate(shard_ranges(num_examples, num_shards)):
    if k % process_count != process_index:
      continue
    path = os.path.join(out_dir, shard_name("train", k, num_shards))
    if os.path.exists(path):
      skipped += 1
    else:
      todo.append((k, start, end, path))
  return todo, skipped


def write_reference_batch(path: str, images: np.ndarray, labels: np.ndarray) -> None:
  """A reference batch in ADM's format (arr_0 uint8 (N, S, S, 3), arr_1 labels): what
  runlocal evaluates against in place of VIRTUAL_imagenet256_labeled.npz."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, arr_0=np.asarray(images, np.uint8), arr_1=np.asarray(labels, np.int64))
  os.replace(path + ".tmp", path)
