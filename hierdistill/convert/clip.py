"""Imports CLIP (transformers' CLIPModel layout) into models.clip.CLIP params.

Published: openai/clip-vit-large-patch14 on the Hugging Face Hub, a folder with config.json and
model.safetensors (the ViT-L/14 of the MJHQ CLIP score). Either the folder or the file alone is
accepted (then the ViT-L/14 sizes of CLIP_VIT_L14 are assumed unless `overrides` say otherwise).

Key mapping: '.' -> '/', list indices folded (encoder.layers.3 -> encoder/layers_3); Linear
(O, I) -> kernel (I, O); the patch conv (O, I, kh, kw) -> (kh, kw, I, O); LayerNorm weight ->
scale; token/position embedding weight -> embedding; class_embedding and logit_scale as they
are. The position_ids buffers some files carry are checked to be 0, 1, 2, ... and dropped.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from hierdistill.convert import fill
from hierdistill.convert.torch_files import load_state_dict

WHERE_PUBLISHED = ("openai/clip-vit-large-patch14 on the Hugging Face Hub (config.json and "
                   "model.safetensors)")
WEIGHT_FILE = "model.safetensors"
_EMBEDDINGS = ("token_embedding", "position_embedding")
# The eos_token_id transformers reads as "pool at argmax(ids)" (configs from before its fix).
_LEGACY_EOS = 2


def flax_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """(Flax param path, layout) of a CLIPModel key."""
  parts = key.split(".")
  out = []
  for part in parts[:-1]:
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  leaf = parts[-1]
  if leaf in ("class_embedding", "logit_scale"):
    return tuple(out) + (leaf,), "as_is"
  if leaf == "position_ids":
    return tuple(out) + (leaf,), "buffer"
  if leaf not in ("weight", "bias") or not out:
    return tuple(parts), "unknown"
  if out[-1] in _EMBEDDINGS:
    return tuple(out) + ("embedding",), "as_is" if leaf == "weight" else "unknown"
  if "norm" in out[-1] or "layrnorm" in out[-1]:
    return tuple(out) + ({"weight": "scale", "bias": "bias"}[leaf],), "as_is"
  if leaf == "bias":
    return tuple(out) + ("bias",), "as_is"
  return tuple(out) + ("kernel",), "conv" if out[-1] == "patch_embedding" else "transpose"


def hf_key(path: Tuple[str, ...]) -> str:
  """The CLIPModel key that fills a Flax param (for error messages)."""
  parts = []
  for part in path[:-1]:
    head, _, index = part.rpartition("_")
    parts.extend([head, index] if head and index.isdigit() else [part])
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  return ".".join(parts + [leaf])


def read_config(path: str) -> Dict[str, Any]:
  """CLIP fields from a transformers config.json beside the weights ({} if none)."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    return {}
  with open(cfg_path) as f:
    raw = json.load(f)
  vision, text = raw.get("vision_config") or {}, raw.get("text_config") or {}
  names = {
      "image_size": (vision, "image_size"), "patch_size": (vision, "patch_size"),
      "vision_hidden_size": (vision, "hidden_size"), "vision_layers": (vision, "num_hidden_layers"),
      "vision_heads": (vision, "num_attention_heads"),
      "vision_intermediate_size": (vision, "intermediate_size"),
      "vocab_size": (text, "vocab_size"), "max_text_length": (text, "max_position_embeddings"),
      "text_hidden_size": (text, "hidden_size"), "text_layers": (text, "num_hidden_layers"),
      "text_heads": (text, "num_attention_heads"),
      "text_intermediate_size": (text, "intermediate_size"),
      "projection_dim": (raw, "projection_dim"), "layer_norm_eps": (text, "layer_norm_eps"),
  }
  out = {field: src[key] for field, (src, key) in names.items() if key in src}
  for src in (vision, text):
    if src.get("hidden_act", "quick_gelu") != "quick_gelu":
      raise ValueError(f"{cfg_path}: hidden_act {src['hidden_act']!r}; this CLIP implements "
                       f"quick_gelu only (the activation of {WHERE_PUBLISHED})")
  if "eos_token_id" in text:
    eos = text["eos_token_id"]
    out["eos_token_id"] = None if eos == _LEGACY_EOS else eos
  return out


def weights_file(path: str) -> str:
  if os.path.isdir(path):
    file = os.path.join(path, WEIGHT_FILE)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{path} has no {WEIGHT_FILE}; expected {WHERE_PUBLISHED}")
    return file
  return path


def import_clip(state_dict: Dict[str, np.ndarray], model, *, path: str = "<state dict>",
                dtype=np.float32) -> Dict[str, Any]:
  """CLIP params (nested dict of numpy arrays) from a CLIPModel state dict; every key used,
  every param filled, shapes checked (errors name the key, the file and where it is published)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  pixels = jnp.zeros((1, model.image_size, model.image_size, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), pixels, jnp.zeros((1, 4), jnp.int32))
  layouts = {"transpose": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}

  def entries():
    for key, value in state_dict.items():
      target, how = flax_path(key)
      value = np.asarray(value)
      if how == "buffer":
        if not np.array_equal(value.reshape(-1), np.arange(value.size)):
          raise ValueError(f"{key} in {path} is not 0, 1, 2, ...; this CLIP uses positions in "
                           f"order (as {WHERE_PUBLISHED})")
        continue
      yield (path, key, None if how == "unknown" else target, value,
             lambda v, ndim, how=how: layouts.get(how, lambda a: a)(v))

  return fill.fill_params(
      entries(), fill.param_shapes(shapes["params"]), layout="the CLIPModel layout",
      where=WHERE_PUBLISHED, hint="check the layer counts", model="CLIP", source=path,
      missing_name=hf_key, dtype=dtype)


def load_clip(path: str, *, config_key: str = "config.clip.path",
              overrides: Optional[Dict[str, Any]] = None, dtype=np.float32):
  """(CLIP module, params) from a Hugging Face folder or a model.safetensors file.

  Sizes: CLIP_VIT_L14, then config.json beside the weights, then `overrides`. A missing path
  raises FileNotFoundError naming config_key.
  """
  from hierdistill.models.clip import CLIP, CLIP_VIT_L14  # pylint: disable=g-import-not-at-top
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file or folder; expected "
                            f"{WHERE_PUBLISHED}")
  fields = {**CLIP_VIT_L14, **read_config(path), **(overrides or {})}
  model = CLIP(**fields)
  file = weights_file(path)
  return model, import_clip(load_state_dict(file), model, path=file, dtype=dtype)
