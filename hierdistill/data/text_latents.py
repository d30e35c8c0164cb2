"""Text-to-image training data as DC-AE latents with their captions' Gemma-2 encodings, in
array_record shards: the format both real-data sources write and the training input that reads
them (docs/t2i.md).

Two sources of "reals" for the AWD's real branch (DMD itself needs the captions only):
  images   an image-caption set (a JSONL of {"image": path under images_dir, "caption": text}),
           each image centre-cropped to image_size (ADM's crop) and encoded once by DC-AE
           (`extract_images`);
  teacher  the teacher's own samples for the training prompts (a JSONL of {"caption": text}, or
           a text file, one prompt a line), made once by the 50-step teacher with CFG
           (`make_teacher_reals`); no image is decoded: the latents are stored directly.
Both write the same layout, so the reader does not know which made a directory:
  info.json                               what made the records (source, networks, sizes, counts)
  train-{k:05d}-of-{n:05d}.array_record   msgpack records:
    latent      float16 (h, w, 32): unscaled DC-AE latent (the teacher's samples / scaling_factor)
    caption     str
    mask        uint8 (L,): SANA's selected mask (BOS and the last L - 1 positions)
    embeddings  float16 (n, D): Gemma-2's output at the n = sum(mask) real positions only
The padded positions' embeddings are not stored: SANA's cross-attention masks them with a
-10,000 bias (exp underflows to exactly 0 in float32), so zeros in their place change nothing.
Storage a record: 2 n D bytes of embeddings + 2 h w 32 of latent + L of mask. With SANA's
instruction the kept window is BOS, the instruction's last token and the prompt (n = prompt
tokens + 2, ~20-80), so at D = 2304 and 1024 px (a 32x32x32 latent, 64 KiB) a record is
~0.15-0.43 MiB (`record_bytes`), against 1.38 MiB for all 300 positions; 1M captions ~0.3 TB.

The training input (`TextLatentPipeline`) is ImageNet's (data/imagenet_latents.py): the order is
InMemoryPipeline's over record ids, a pure function of (seed, step), so resume is exact; each
process reads only its rows of the global batch by random access.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
from flax import serialization

from hierdistill.data import imagenet_latents as il
from hierdistill.data.pipeline import InMemoryPipeline

NAME = "t2i_latents"
FORMAT_VERSION = 1
SOURCES = ("images", "teacher")
F16_MAX = 65504.0


def encode_record(latent: np.ndarray, caption: str, embeddings: np.ndarray,
                  mask: np.ndarray) -> bytes:
  """One record: embeddings (L, D) and mask (L,) as the text encoder gives them; only the
  masked-in rows are kept."""
  mask = np.asarray(mask).astype(bool)
  kept = np.asarray(embeddings, np.float32)[mask]
  if not np.all(np.isfinite(kept)) or np.abs(kept).max(initial=0.0) > F16_MAX:
    raise ValueError(f"caption {caption[:60]!r}: text embeddings outside float16's range; "
                     "they cannot be stored in this format")
  return serialization.msgpack_serialize({
      "latent": np.asarray(latent, np.float16), "caption": str(caption),
      "mask": mask.astype(np.uint8), "embeddings": kept.astype(np.float16)})


def decode_record(data: bytes) -> Dict[str, Any]:
  return serialization.msgpack_restore(data)


def expand_embeddings(rec: Dict[str, Any]) -> np.ndarray:
  """(L, D) float32 embeddings of a record, zeros at the padded positions."""
  mask = np.asarray(rec["mask"]).astype(bool)
  kept = np.asarray(rec["embeddings"], np.float32)
  out = np.zeros((len(mask), kept.shape[-1]), np.float32)
  out[mask] = kept
  return out


def record_bytes(n_tokens: int, width: int, latent_shape: Sequence[int],
                 length: int = 300) -> int:
  """The payload of one record (float16 latent and kept embeddings, uint8 mask), without
  msgpack's few dozen bytes of keys and caption."""
  return 2 * n_tokens * width + 2 * int(np.prod(latent_shape)) + length


class TextLatentPipeline:
  """Batches {'x': scaling_factor * latents (B / P, h, w, C) float32, 'c': {'embeddings':
  (B / P, L, D) float32, 'mask': (B / P, L) int32}} by step, read from the shards.

  dataset: il.open_latents(dir) (the same LatentDataset). global_batch_size, seed,
  process_index, process_count: as InMemoryPipeline. prefetch: batches read ahead by iterate().
  """

  def __init__(self, dataset: il.LatentDataset, global_batch_size: int, seed: int, *,
               scaling_factor: float, process_index: int = 0, process_count: int = 1,
               prefetch: int = 2):
    from array_record.python.array_record_data_source import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
    self.dataset = dataset
    self.source = ArrayRecordDataSource(list(dataset.paths))
    if len(self.source) != dataset.num_examples:
      raise ValueError(f"the shards hold {len(self.source)} records but info.json says "
                       f"{dataset.num_examples}")
    n = dataset.num_examples
    self._order = InMemoryPipeline(np.arange(n), np.zeros(n, np.int32), global_batch_size, seed,
                                   process_index, process_count)
    self.global_batch_size, self.local_batch_size = global_batch_size, self._order.local_batch_size
    self.seed, self.scaling_factor, self.prefetch = seed, float(scaling_factor), prefetch
    self.images = np.broadcast_to(np.zeros((), np.float32), (n,) + tuple(dataset.shape))

  @property
  def num_examples(self) -> int:
    return self.dataset.num_examples

  def global_indices(self, step: int) -> np.ndarray:
    return self._order.global_indices(step)

  def local_indices(self, step: int) -> np.ndarray:
    return self._order.local_indices(step)

  def batch(self, step: int) -> Dict[str, Any]:
    recs = [decode_record(r) for r in self.source.__getitems__(
        [int(i) for i in self.local_indices(step)])]
    return {"x": self.scaling_factor * np.stack([np.asarray(r["latent"], np.float32)
                                                 for r in recs]),
            "c": {"embeddings": np.stack([expand_embeddings(r) for r in recs]),
                  "mask": np.stack([np.asarray(r["mask"], np.int32) for r in recs])}}

  def __iter__(self):
    return self.iterate(0)

  def iterate(self, start_step: int = 0) -> Iterator[Dict[str, Any]]:
    """Endless batches from start_step on, `prefetch` steps read ahead in a thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending = [pool.submit(self.batch, s)
                 for s in range(start_step, start_step + max(self.prefetch, 1))]
      step = start_step + len(pending)
      while True:
        yield pending.pop(0).result()
        pending.append(pool.submit(self.batch, step))
        step += 1


def read_captions(path: str, config_key: str, need_image: bool) -> List[Dict[str, str]]:
  """Rows of a JSONL ({"caption", and "image" when need_image}) or, without images, a text file
  of one prompt a line. One line naming the key and the row on a bad file."""
  if not path or not os.path.isfile(path):
    kind = "a JSONL of {\"image\", \"caption\"}" if need_image else \
        "a JSONL of {\"caption\"} or a text file, one prompt a line"
    raise FileNotFoundError(f"{config_key}={path!r}: no such file; expected {kind}")
  rows = []
  with open(path) as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      if path.endswith(".jsonl") or line.lstrip().startswith("{"):
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{config_key}={path!r}: line {i + 1} is not JSON ({e})") from None
      else:
        row = {"caption": line.rstrip("\n")}
      if not isinstance(row.get("caption"), str) or (need_image and
                                                     not isinstance(row.get("image"), str)):
        want = "'image' and 'caption'" if need_image else "'caption'"
        raise ValueError(f"{config_key}={path!r}: line {i + 1} lacks {want} strings")
      rows.append(row)
  if not rows:
    raise ValueError(f"{config_key}={path!r}: no captions in it")
  return rows


def write_shards(*, out_dir: str, num_examples: int, num_shards: int, batch_size: int,
                 make_batch: Callable[[int, int], List[bytes]], info: Dict[str, Any],
                 process_index: int = 0, process_count: int = 1, log=print) -> Dict[str, int]:
  """Writes this process's shards (k = process_index mod process_count): records [start, end)
  of shard k come from make_batch(i, j) over batches [i, j). Finished shards are skipped, so an
  interrupted run resumes by shard; a shard is written under a temporary name and renamed when
  complete. Process 0 writes info.json first."""
  if num_shards % process_count:
    raise ValueError(f"config.data.num_shards={num_shards} must be a multiple of the "
                     f"{process_count} processes")
  if num_shards > num_examples:
    raise ValueError(f"config.data.num_shards={num_shards} is more than the {num_examples} "
                     "examples; lower it")
  os.makedirs(out_dir, exist_ok=True)
  if process_index == 0:
    il.write_info(out_dir, {**info, "format": NAME, "t2i_format_version": FORMAT_VERSION,
                            "num_examples": num_examples, "num_shards": num_shards,
                            "num_classes": 0})
  written = 0
  todo, skipped = il.shards_to_write(out_dir, num_examples, num_shards, process_index,
                                     process_count)
  for k, start, end, path in todo:
    writer = il.ShardWriter(path)
    for i in range(start, end, batch_size):
      for rec in make_batch(i, min(i + batch_size, end)):
        writer.write(rec)
    if writer.count != end - start:
      raise RuntimeError(f"shard {k}: made {writer.count} records, expected {end - start}")
    writer.close()
    written += 1
    log(f"[t2i data] shard {k + 1}/{num_shards}: {end - start} records -> {path}")
  return {"written": written, "skipped": skipped}


def extract_images(*, rows: Sequence[Dict[str, str]], images_dir: str, image_size: int,
                   encode_images: Callable[[np.ndarray], np.ndarray],
                   encode_text: Callable[[Sequence[str]], Dict[str, np.ndarray]],
                   out_dir: str, num_shards: int, batch_size: int, info: Dict[str, Any],
                   latent_shape: Sequence[int], process_index: int = 0, process_count: int = 1,
                   log=print) -> Dict[str, int]:
  """An image-caption set -> records. encode_images(uint8 (B, S, S, 3)) -> unscaled latents
  (B, h, w, C) (DC-AE); encode_text(captions) -> {'embeddings', 'mask'} (SanaTextEncoder).
  Batches are padded to batch_size (fixed shapes: one compile) and trimmed."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def load(row):
    path = os.path.join(images_dir, row["image"])
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.data.images_dir={images_dir!r}: no image {row['image']} "
                              "(named in config.data.captions_file)")
    with Image.open(path) as im:
      return il.adm_center_crop(np.asarray(im.convert("RGB")), image_size)

  def make_batch(i, j):
    chunk = list(rows[i:j])
    images = np.stack([load(r) for r in chunk])
    captions = [r["caption"] for r in chunk]
    pad = batch_size - len(chunk)
    latents = encode_images(np.concatenate([images, np.repeat(images[-1:], pad, 0)]))
    text = encode_text(captions + [captions[-1]] * pad)
    return [encode_record(latents[n], captions[n], text["embeddings"][n], text["mask"][n])
            for n in range(len(chunk))]

  info = {**info, "real_source": "images", "image_size": image_size, "crop": "adm_center_crop",
          "latent_shape": list(latent_shape)}
  return write_shards(out_dir=out_dir, num_examples=len(rows), num_shards=num_shards,
                      batch_size=batch_size, make_batch=make_batch, info=info,
                      process_index=process_index, process_count=process_count, log=log)


def teacher_noise(seed: int, index: int, latent_shape: Sequence[int]) -> np.ndarray:
  """The noise of teacher real `index`: a function of (seed, index) alone, so a resumed or
  re-sharded run makes the same samples."""
  return np.random.default_rng([seed, index, 0x7EAC]).standard_normal(
      tuple(latent_shape), dtype=np.float32)


def make_teacher_reals(*, rows: Sequence[Dict[str, str]], sample: Callable,
                       encode_text: Callable[[Sequence[str]], Dict[str, np.ndarray]],
                       scaling_factor: float, latent_shape: Sequence[int], seed: int,
                       out_dir: str, num_shards: int, batch_size: int, info: Dict[str, Any],
                       process_index: int = 0, process_count: int = 1,
                       log=print) -> Dict[str, int]:
  """Training prompts -> the teacher's samples as records. sample(noise (B, h, w, C), c) ->
  scaled latents (the teacher's sampler with its CFG, jitted by the caller); stored unscaled
  (/ scaling_factor) as the image source's latents are."""

  def make_batch(i, j):
    captions = [r["caption"] for r in rows[i:j]]
    pad = batch_size - len(captions)
    noise = np.stack([teacher_noise(seed, n, latent_shape) for n in range(i, j)]
                     + [np.zeros(tuple(latent_shape), np.float32)] * pad)
    text = encode_text(captions + [captions[-1]] * pad)
    latents = np.asarray(sample(noise, text), np.float32) / scaling_factor
    return [encode_record(latents[n], captions[n], text["embeddings"][n], text["mask"][n])
            for n in range(len(captions))]

  info = {**info, "real_source": "teacher", "seed": seed, "latent_shape": list(latent_shape)}
  return write_shards(out_dir=out_dir, num_examples=len(rows), num_shards=num_shards,
                      batch_size=batch_size, make_batch=make_batch, info=info,
                      process_index=process_index, process_count=process_count, log=log)


def open_text_latents(latents_dir: str, config_key: str = "config.data.latents_dir"
                      ) -> il.LatentDataset:
  """The LatentDataset of a t2i latents dir; a dir of another format is one line."""
  if not latents_dir or not os.path.isfile(os.path.join(latents_dir, il.INFO_FILE)):
    raise FileNotFoundError(
        f"{config_key}={latents_dir!r}: no {il.INFO_FILE} there; expected the shards that "
        "launch/extract_t2i_latents.py writes (--source=images or --source=teacher, "
        "docs/t2i.md)")
  ds = il.open_latents(latents_dir, config_key=config_key)
  if ds.info.get("format") != NAME:
    raise ValueError(f"{config_key}={latents_dir!r} holds {ds.info.get('format', 'ImageNet')} "
                     f"records, not {NAME}'s (text-to-image latents with captions): point it "
                     "to what launch/extract_t2i_latents.py writes")
  return il.LatentDataset(NAME, ds.num_examples, 0, ds.shape, ds.info, ds.paths)


def read_all(dataset: il.LatentDataset, limit: Optional[int] = None) -> List[Dict[str, Any]]:
  """The first `limit` records decoded (tests, inspection)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
  source = ArrayRecordDataSource(list(dataset.paths))
  n = len(source) if limit is None else min(limit, len(source))
  return [decode_record(r) for r in source.__getitems__(list(range(n)))]
