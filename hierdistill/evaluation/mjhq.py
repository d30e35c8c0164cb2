"""MJHQ-30K evaluation of a text-to-image model as SANA's tools run it: FID against the 30,000
MJHQ images, per-category FID, and CLIP score (docs/t2i.md).

The protocol (NVlabs/Sana tools/metrics, T2I.md section 3):
- prompts and categories: meta_data.json of playgroundai/MJHQ-30K, {image_id: {"category",
  "prompt"}}, 10 categories x 3,000; one sample per prompt. With fewer samples than prompts
  (eval.num_samples < 30,000: tests, quick looks) `select_prompts` takes the categories in turn,
  so every category keeps the same share. Only 30,000 gives numbers comparable with the papers.
- FID: both the reference images (imgs/<category>/<image_id>.jpg, 1024 px) and the samples go
  through torchvision's Resize(size) + CenterCrop(size) on a PIL image (`resize_center_crop`,
  size 512 by default as SANA's scripts/bash_run_inference_metric.sh), then pytorch-fid's
  Inception pool3 features: its bilinear resize to 299 and 2x - 1 ('pytorch_fid' mode of
  evaluation/inception.py; the same FID weights as ImageNet's). Samples are first stored as the
  8-bit image a PNG would hold.
- per-category FID: the samples of one category against the reference images of that category.
- CLIP score: OpenAI CLIP ViT-L/14, 100 x cos(image, prompt), prompts cut at 77 tokens (start,
  75 tokens, end), on the sample at its generated size with CLIP's own preprocessing; the mean
  over samples (and per category).
- the reference statistics (mu, sigma overall and per category) are computed once and cached in
  an npz with `made_by`, what made them (files, count, size, resizing, feature net); a cache made
  otherwise is refused, never silently reused.
With random feature networks (tests, runlocal) the columns are named FD-random-inception and
CLIP-random: they are neither FID nor CLIP score.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import sharding as shard_lib
from hierdistill.evaluation import frechet
from hierdistill.evaluation import grids

CATEGORIES = ("animals", "art", "fashion", "food", "indoor", "landscape", "logo", "people",
              "plants", "vehicles")
META_FILE = "meta_data.json"
WHERE_PUBLISHED = ("playgroundai/MJHQ-30K on the Hugging Face Hub: meta_data.json, and "
                   "mjhq30k_imgs.zip unpacked to <dir>/<category>/<image_id>.jpg")
RESIZE = "PIL bilinear Resize(size) of the shorter side + CenterCrop(size) (torchvision)"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Prompt:
  image_id: str
  category: str
  prompt: str


def read_meta(path: str, config_key: str = "config.eval.mjhq_meta") -> List[Prompt]:
  """The prompts of meta_data.json, sorted by (category, image_id). One line on a bad file."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file; expected {META_FILE} of "
                            f"{WHERE_PUBLISHED}")
  with open(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_key}={path!r}: not JSON ({e})") from None
  if not isinstance(meta, dict) or not meta:
    raise ValueError(f"{config_key}={path!r}: expected a non-empty map image_id -> "
                     "{'category', 'prompt'}")
  out = []
  for image_id, entry in meta.items():
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not (
        isinstance(entry.get("category"), str) and entry["category"]):
      raise ValueError(f"{config_key}={path!r}: entry {image_id!r} lacks a 'category' or "
                       "'prompt' string")
    out.append(Prompt(str(image_id), entry["category"], entry["prompt"]))
  return sorted(out, key=lambda p: (p.category, p.image_id))


def select_prompts(prompts: Sequence[Prompt], num_samples: int) -> List[Prompt]:
  """num_samples prompts, the categories taken in turn (first of each, second of each, ...), so
  every category keeps its share; all of them (in category order) when num_samples == len."""
  if num_samples > len(prompts) or num_samples < 1:
    raise ValueError(f"config.eval.num_samples={num_samples}: the meta file has "
                     f"{len(prompts)} prompts (one sample per prompt); set 1..{len(prompts)}")
  if num_samples == len(prompts):
    return list(prompts)
  by_cat: Dict[str, List[Prompt]] = {}
  for p in prompts:
    by_cat.setdefault(p.category, []).append(p)
  out, i = [], 0
  while len(out) < num_samples:
    for cat in sorted(by_cat):
      if i < len(by_cat[cat]) and len(out) < num_samples:
        out.append(by_cat[cat][i])
    i += 1
  return out


def image_path(images_dir: str, p: Prompt) -> str:
  return os.path.join(images_dir, p.category, f"{p.image_id}.jpg")


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision's Resize(size) then CenterCrop(size) of a PIL image, as SANA's FID tools do:
  the shorter side to `size` (the longer to int(size * long / short)) with PIL's bilinear filter
  (antialiased), then the centre size x size from offset round((h - size) / 2).
  image: (H, W, 3) uint8. Returns (size, size, 3) uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  w, h = pil.size
  short, long = min(w, h), max(w, h)
  if short != size:
    new_long = int(size * long / short)
    pil = pil.resize((size, new_long) if w <= h else (new_long, size), resample=Image.BILINEAR)
  arr = np.asarray(pil)
  top = int(round((arr.shape[0] - size) / 2.0))
  left = int(round((arr.shape[1] - size) / 2.0))
  return arr[top:top + size, left:left + size]


def load_image(path: str, config_key: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{config_key}: no image {path}; expected {WHERE_PUBLISHED}")
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] -> uint8 as a saved PNG holds it: clip(127.5 x + 128, 0, 255), truncated."""
  return jnp.clip(127.5 * images + 128.0, 0.0, 255.0).astype(jnp.uint8)


def category_statistics(features: np.ndarray, categories: Sequence[str]) -> Dict[str, Any]:
  """{'all': (mu, sigma), category: (mu, sigma)} of pool features (N, 2048); categories with
  fewer than 2 features are left out (no covariance)."""
  categories = np.asarray(categories)
  out = {"all": frechet.feature_statistics(features)}
  for cat in sorted(set(categories.tolist())):
    rows = features[categories == cat]
    if len(rows) >= 2:
      out[cat] = frechet.feature_statistics(rows)
  return out


def save_statistics(path: str, stats: Dict[str, Any], counts: Dict[str, int],
                    made_by: Dict[str, Any]) -> None:
  """Written under a temporary name and renamed: an interrupted run leaves no half cache."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {}
  for name, (mu, sigma) in stats.items():
    arrays[f"mu/{name}"], arrays[f"sigma/{name}"] = mu, sigma
  with open(path + ".tmp", "wb") as f:
    np.savez(f, made_by=json.dumps(made_by, sort_keys=True), counts=json.dumps(counts), **arrays)
  os.replace(path + ".tmp", path)


def load_statistics(path: str, made_by: Dict[str, Any],
                    config_key: str = "config.eval.reference_stats"):
  """(stats, counts) of a cache written by save_statistics; ValueError (one line) when it was
  made otherwise than `made_by` asks."""
  with np.load(path) as npz:
    stored = json.loads(str(npz["made_by"]))
    if stored != json.loads(json.dumps(made_by, sort_keys=True)):
      diff = sorted(k for k in set(stored) | set(made_by) if stored.get(k) != made_by.get(k))
      raise ValueError(
          f"{config_key}={path!r} was made with other settings ({', '.join(diff)}: "
          f"{[stored.get(k) for k in diff]} vs {[made_by.get(k) for k in diff]}); delete it or "
          "point the key to a new file")
    counts = json.loads(str(npz["counts"]))
    stats = {name: (np.asarray(npz[f"mu/{name}"]), np.asarray(npz[f"sigma/{name}"]))
             for name in counts}
  return stats, counts


class MJHQScorer:
  """Samples, decodes and scores a text-to-image model on MJHQ prompts (module docstring).

  decode: jit-able latents (B, h, w, C) -> images (B, H, W, 3) in [-1, 1] (the autoencoder, its
    params closed over). encode_prompts: host list of prompts -> the model's condition pytree
    (B, ...) (the text encoder: Gemma-2 for SANA). inception, inception_params: the FID
    Inception. clip, clip_params, clip_tokenize(list of prompts) -> (B, 77) ids: CLIP ViT-L/14.
    mesh: batches split over its devices. size: the FID resolution (512). batch_size: samples
    per batch (rounded up to a multiple of the devices). random_features: name the columns
    FD-random-inception / CLIP-random. inception_size: the Inception's input (299; smaller
    only with random weights).
  """

  def __init__(self, *, decode: Callable, encode_prompts: Callable, inception, inception_params,
               clip, clip_params, clip_tokenize: Callable, mesh, size: int = 512,
               batch_size: int = 50, random_features: bool = False,
               inception_size: int = 299):
    from hierdistill.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
    from hierdistill.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
    # Batches are padded up to a multiple of the devices (the padding is trimmed), so one
    # config runs on any device count.
    n = mesh.devices.size
    self.mesh, self.size, self.batch_size = mesh, int(size), -(-int(batch_size) // n) * n
    rep, batch = shard_lib.replicated(mesh), shard_lib.batch_sharding(mesh)
    self.encode_prompts, self.clip_tokenize = encode_prompts, clip_tokenize
    self.fd_name = "FD-random-inception" if random_features else "FID"
    self.clip_name = "CLIP-random" if random_features else "CLIP"
    self.inception_params = jax.device_put(inception_params, rep)
    self.clip_params = jax.device_put(clip_params, rep)
    feature_fn = inception_lib.make_feature_fn(inception, "pytorch_fid", inception_size)
    self._features = jax.jit(lambda p, x: feature_fn(p, x)["pool"],
                             in_shardings=(rep, batch), out_shardings=rep)
    self._decode = jax.jit(lambda z: to_uint8(decode(z)), in_shardings=batch,
                           out_shardings=batch)

    def score(p, images, ids):
      pixels = clip_lib.preprocess_images(images, clip.image_size)
      img = clip.apply({"params": p}, pixels, method=clip.encode_image)
      txt = clip.apply({"params": p}, ids, method=clip.encode_text)
      return clip_lib.clip_score(img, txt)
    self._clip = jax.jit(score, in_shardings=(rep, batch, batch), out_shardings=rep)

  def features(self, images: np.ndarray) -> np.ndarray:
    """Pool features (N, 2048) float32 of uint8 images already at size x size, in batches."""
    out, bs = [], self.batch_size
    for start in range(0, len(images), bs):
      chunk = np.asarray(images[start:start + bs])
      k = len(chunk)
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - k, 0)]) if k < bs else chunk
      out.append(np.asarray(self._features(self.inception_params, chunk))[:k])
    return np.concatenate(out)

  def reference_statistics(self, prompts: Sequence[Prompt], images_dir: str, cache_path: str,
                           made_by: Dict[str, Any], log=print):
    """(stats, counts) of the reference images of `prompts`: read from cache_path when it was
    made the same way, else computed (each image resized and cropped to size) and cached."""
    made_by = {**made_by, "num_images": len(prompts), "size": self.size, "resize": RESIZE,
               "format_version": FORMAT_VERSION}
    if cache_path and os.path.isfile(cache_path):
      return load_statistics(cache_path, made_by)
    log(f"[mjhq] reference statistics of {len(prompts)} images at {self.size} px -> "
        f"{cache_path}")
    feats = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = prompts[start:start + self.batch_size]
      images = np.stack([resize_center_crop(load_image(image_path(images_dir, p),
                                                       "config.eval.mjhq_images"), self.size)
                         for p in chunk])
      feats.append(self.features(images))
    feats = np.concatenate(feats)
    cats = [p.category for p in prompts]
    stats = category_statistics(feats, cats)
    counts = {name: (len(cats) if name == "all" else cats.count(name)) for name in stats}
    if cache_path and jax.process_index() == 0:
      save_statistics(cache_path, stats, counts, made_by)
    return stats, counts

  def measure(self, sample_fn: Callable, params, *, prompts: Sequence[Prompt], latent_shape,
              key, reference: Dict[str, Any], keep_images: int = 0):
    """Samples sample_fn(params, noise, c) for each prompt (noise folded from key by batch
    start, c = encode_prompts(batch)), and scores them. Returns (row, the first keep_images
    samples as uint8 at their generated size)."""
    batch = shard_lib.batch_sharding(self.mesh)
    sample = jax.jit(sample_fn, in_shardings=(None, batch, batch), out_shardings=batch)
    feats, scores, kept, bs = [], [], [], self.batch_size
    for start in range(0, len(prompts), bs):
      chunk = list(prompts[start:start + bs])
      k = len(chunk)
      texts = [p.prompt for p in chunk] + [chunk[-1].prompt] * (bs - k)  # padded batch
      noise = jax.random.normal(jax.random.fold_in(key, start), (bs,) + tuple(latent_shape))
      images = self._decode(sample(params, noise, self.encode_prompts(texts)))
      scores.append(np.asarray(self._clip(self.clip_params, images,
                                          jnp.asarray(self.clip_tokenize(texts))))[:k])
      host = np.asarray(jax.device_get(images))[:k]
      feats.append(self.features(np.stack([resize_center_crop(im, self.size) for im in host])))
      if sum(len(x) for x in kept) < keep_images:
        kept.append(host)
    row = self.score(np.concatenate(feats), np.concatenate(scores),
                     [p.category for p in prompts], reference)
    images = np.concatenate(kept)[:keep_images] if kept else np.zeros((0,), np.uint8)
    return row, images

  def score(self, features: np.ndarray, clip_scores: np.ndarray, categories: Sequence[str],
            reference: Dict[str, Any]) -> Dict[str, float]:
    """FID overall and per category, CLIP score overall and per category."""
    ours = category_statistics(features, categories)
    row = {self.fd_name: frechet.frechet_distance(*reference["all"], *ours["all"]),
           self.clip_name: float(np.mean(clip_scores))}
    cats = np.asarray(categories)
    for cat in sorted(set(cats.tolist())):
      if cat in ours and cat in reference:
        row[f"{self.fd_name}/{cat}"] = frechet.frechet_distance(*reference[cat], *ours[cat])
      row[f"{self.clip_name}/{cat}"] = float(np.mean(clip_scores[cats == cat]))
    return {k: float(v) for k, v in row.items()}


def save_rows(images: np.ndarray, captions: Sequence[str], path: str, columns: int) -> None:
  """Images in [-1, 1] in rows of `columns`, each row's caption printed under it
  (grids.save_tile_rows); captions: one a row."""
  images = np.asarray(images)
  rows = -(-len(images) // columns)
  if len(captions) < rows:
    raise ValueError(f"{rows} rows need {rows} captions; got {len(captions)}")
  tiles = [grids.image_grid(images[r * columns:(r + 1) * columns], nrow=columns)
           for r in range(rows)]
  grids.save_tile_rows(tiles, list(captions[:rows]), path)


def save_prompt_grid(images: np.ndarray, prompts: Sequence[Prompt], path: str,
                     thumbnail: int = 128, max_chars: int = 110) -> None:
  """uint8 samples as a PNG, one a row at `thumbnail` px with its category and prompt under it
  (cut at max_chars), so a grid says what each sample was asked for."""
  if not len(images):
    return
  from PIL import Image  # pylint: disable=g-import-not-at-top
  thumbs = np.stack([np.asarray(Image.fromarray(np.asarray(im, np.uint8)).resize(
      (thumbnail, thumbnail), resample=Image.BILINEAR)) for im in images])
  captions = [f"[{p.category}] {p.prompt}"[:max_chars] for p in prompts[:len(images)]]
  save_rows(thumbs.astype(np.float32) / 127.5 - 1.0, captions, path, columns=1)


def describe(*, num_samples: int, size: int, meta: str, reference: str, counts: Dict[str, int],
             random_features: bool, sampler: str) -> Dict[str, Any]:
  """What every row was measured with, stored beside the rows."""
  return {
      "protocol": "MJHQ-30K as SANA's tools: FID (pytorch-fid Inception pool3) at "
                  f"{size} px after {RESIZE}; CLIP score ViT-L/14, 100 x cos, 77 tokens",
      "feature_nets": ("random Inception and CLIP (NOT FID, NOT CLIP score)" if random_features
                       else "FID Inception-v3 (pt_inception-2015-12-05), CLIP ViT-L/14"),
      "num_samples": int(num_samples), "meta": meta,
      "reference": f"{reference} ({counts.get('all', 0)} images)",
      "teacher_sampler": sampler,
      "sample_encoding": "uint8 clip(127.5 x + 128), as a PNG holds it"}
