"""Mock files of the text-to-image run, for runlocal and tests (no download): an image-caption
set, an MJHQ-30K folder, word-level tokenizers for the text encoder and CLIP, and a tiny random
SANA written in diffusers' layout, so that the run reads them through the same code as the
published files. Their numbers mean nothing.

Layout under `root`:
  pairs/captions.jsonl, pairs/imgs/{i}.png    coloured shapes with their captions
  mjhq/meta_data.json, mjhq/imgs/<category>/<id>.jpg
  gemma_tokenizer/tokenizer.json, clip_tokenizer/tokenizer.json
  sana/transformer/{config.json, diffusion_pytorch_model.safetensors}
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import numpy as np

from hierdistill.evaluation import mjhq as mjhq_lib
from hierdistill.text import sana_encoder
from hierdistill.text import sana_prompts

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
          "yellow": (235, 215, 40), "black": (20, 20, 20), "white": (240, 240, 240)}
SHAPES = ("square", "circle", "bar")
GRID_PROMPTS = ("a red circle on a white background", "a blue square on a yellow background",
                "a green bar on a black background", "a white circle on a blue background")
DONE = "done.json"


def caption_of(i: int) -> tuple:
  names = list(COLORS)
  fg, bg, shape = names[i % 6], names[(i // 6 + 1 + i % 6) % 6], SHAPES[(i // 3) % 3]
  if fg == bg:
    bg = names[(names.index(bg) + 1) % 6]
  return fg, bg, shape


def draw(fg: str, bg: str, shape: str, size: int) -> np.ndarray:
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  im = Image.new("RGB", (size, size), COLORS[bg])
  d = ImageDraw.Draw(im)
  a, b = size // 4, 3 * size // 4
  if shape == "square":
    d.rectangle([a, a, b, b], fill=COLORS[fg])
  elif shape == "circle":
    d.ellipse([a, a, b, b], fill=COLORS[fg])
  else:
    d.rectangle([size // 8, 2 * size // 5, 7 * size // 8, 3 * size // 5], fill=COLORS[fg])
  return np.asarray(im)


def prompt_texts(num_pairs: int, mjhq_per_category: int) -> List[str]:
  caps = [f"a {fg} {shape} on a {bg} background" for fg, bg, shape in
          map(caption_of, range(num_pairs))]
  mjhq = [f"a {cat} picture, {fg} {shape}" for cat in mjhq_lib.CATEGORIES
          for fg, _, shape in map(caption_of, range(mjhq_per_category))]
  return caps + mjhq + list(GRID_PROMPTS)


def make(root: str, *, num_pairs: int, image_size: int, mjhq_per_category: int,
         mjhq_size: int) -> Dict[str, str]:
  """Writes the mock files once (a marker file says they are complete) and returns their
  paths: captions_file, images_dir, mjhq_meta, mjhq_images, gemma_tokenizer, clip_tokenizer."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  paths = {"captions_file": os.path.join(root, "pairs", "captions.jsonl"),
           "images_dir": os.path.join(root, "pairs", "imgs"),
           "mjhq_meta": os.path.join(root, "mjhq", mjhq_lib.META_FILE),
           "mjhq_images": os.path.join(root, "mjhq", "imgs"),
           "gemma_tokenizer": os.path.join(root, "gemma_tokenizer", "tokenizer.json"),
           "clip_tokenizer": os.path.join(root, "clip_tokenizer", "tokenizer.json")}
  if os.path.isfile(os.path.join(root, DONE)):
    return paths
  os.makedirs(paths["images_dir"], exist_ok=True)
  lines = []
  for i in range(num_pairs):
    fg, bg, shape = caption_of(i)
    Image.fromarray(draw(fg, bg, shape, image_size)).save(
        os.path.join(paths["images_dir"], f"{i}.png"))
    lines.append(json.dumps({"image": f"{i}.png",
                             "caption": f"a {fg} {shape} on a {bg} background"}))
  with open(paths["captions_file"], "w") as f:
    f.write("\n".join(lines) + "\n")
  meta = {}
  for c, cat in enumerate(mjhq_lib.CATEGORIES):
    os.makedirs(os.path.join(paths["mjhq_images"], cat), exist_ok=True)
    for i in range(mjhq_per_category):
      fg, bg, shape = caption_of(i + c)
      image_id = f"{c:02d}{i:06x}"
      meta[image_id] = {"category": cat, "prompt": f"a {cat} picture, {fg} {shape}"}
      Image.fromarray(draw(fg, bg, shape, mjhq_size)).save(
          os.path.join(paths["mjhq_images"], cat, f"{image_id}.jpg"), quality=95)
  with open(paths["mjhq_meta"], "w") as f:
    json.dump(meta, f)
  texts = prompt_texts(num_pairs, mjhq_per_category)
  for key, specials, extra in (
      ("gemma_tokenizer", ("<pad>", "<eos>", "<bos>", "<unk>"),
       list(sana_prompts.COMPLEX_HUMAN_INSTRUCTION)),
      ("clip_tokenizer", ("<|padding|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"), [])):
    os.makedirs(os.path.dirname(paths[key]), exist_ok=True)
    sana_encoder.word_tokenizer(extra + texts, specials).save(paths[key])
  with open(os.path.join(root, DONE), "w") as f:
    json.dump({"num_pairs": num_pairs, "image_size": image_size}, f)
  return paths


def write_sana_folder(folder: str, model, params: Dict[str, Any]) -> str:
  """`params` of a SanaTransformer teacher as a diffusers transformer folder (config.json and
  diffusion_pytorch_model.safetensors, torch layouts); returns the weights file's path."""
  from hierdistill.convert import sana as convert_sana  # pylint: disable=g-import-not-at-top
  return convert_sana.write_diffusers(folder, model, params)


def random_sana_teacher(model, seed: int = 0, scale: float = 0.05) -> Dict[str, Any]:
  """A teacher's params: flax's init plus `scale` N(0, 1) on every leaf, so that the zero-init
  gates and output layer do not make a constant network."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  z = jnp.zeros((1, 2, 2, model.in_channels))
  c = {"embeddings": jnp.zeros((1, 3, model.caption_channels)), "mask": jnp.ones((1, 3),
                                                                                  jnp.int32)}
  params = model.init(jax.random.PRNGKey(seed), z, None, jnp.ones((1,)), c)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p, np.float32)
                      + scale * rng.standard_normal(p.shape).astype(np.float32), params)
