"""Imports Gemma-2 weights (Hugging Face safetensors) into models.gemma2.Gemma2Encoder params.

Published: Efficient-Large-Model/gemma-2-2b-it (the copy SANA's pipelines load) or
google/gemma-2-2b-it on the Hugging Face Hub: a folder with config.json and model.safetensors,
or shards model-0000k-of-0000n.safetensors listed in model.safetensors.index.json. Either a
folder or one .safetensors file is accepted (then the 2B sizes of GEMMA2_2B are assumed unless
`overrides` say otherwise).

Key mapping (transformers' names): a Gemma2ForCausalLM checkpoint prefixes every key with
"model."; a bare Gemma2Model has none; both are read. `lm_head.weight` (the LM head, tied to the
embedding in Gemma) is dropped on purpose: SANA uses the decoder's hidden states only. Linear
weights (O, I) -> kernel (I, O); embed_tokens.weight -> embed_tokens/embedding as is; RMSNorm
weights are kept as the offsets they are (the scale is 1 + weight). No torch needed: files are
read by convert/torch_files.py (safetensors' numpy API).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from hierdistill.convert import fill
from hierdistill.convert.torch_files import load_state_dict

WHERE_PUBLISHED = ("Efficient-Large-Model/gemma-2-2b-it or google/gemma-2-2b-it on the Hugging "
                   "Face Hub (config.json and model.safetensors, or shards listed in "
                   "model.safetensors.index.json)")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PREFIX = "model."
_DROPPED = ("lm_head.",)
# config.json keys -> Gemma2Encoder fields; the rest (bos/eos ids, final_logit_softcapping of the
# LM head, torch_dtype, ...) do not shape the decoder stack.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim", "query_pre_attn_scalar": "query_pre_attn_scalar",
    "attn_logit_softcapping": "attn_logit_softcap", "sliding_window": "sliding_window",
    "rms_norm_eps": "rms_norm_eps", "layer_types": "layer_types",
}


def flax_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """(Flax param path, layout) of a Gemma2Model key without the "model." prefix."""
  parts = key.split(".")
  out: List[str] = []
  for part in parts[:-1]:
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  if parts[-1] != "weight" or not out:
    return tuple(parts), "unknown"
  if out[-1] == "embed_tokens":
    return tuple(out) + ("embedding",), "as_is"
  if out[-1].endswith("norm"):
    return tuple(out) + ("weight",), "as_is"
  return tuple(out) + ("kernel",), "transpose"


def hf_key(path: Tuple[str, ...]) -> str:
  """The CausalLM-checkpoint key that fills a Flax param (for error messages)."""
  parts = []
  for part in path[:-1]:
    head, _, index = part.rpartition("_")
    parts.extend([head, index] if head and index.isdigit() else [part])
  return _PREFIX + ".".join(parts) + ".weight"


def read_config(path: str) -> Dict[str, Any]:
  """Gemma2Encoder fields from a transformers config.json beside the weights ({} if none)."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    return {}
  with open(cfg_path) as f:
    raw = json.load(f)
  raw = raw.get("text_config", raw)
  out = {field: raw[key] for key, field in _CONFIG_FIELDS.items() if key in raw}
  # transformers >= 5 nests rope_theta in rope_parameters; older configs have it at the top.
  theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))
  if theta is not None:
    out["rope_theta"] = float(theta)
  if out.get("layer_types") is not None:
    out["layer_types"] = tuple(out["layer_types"])
  return out


def weight_files(path: str) -> List[str]:
  """The .safetensors files of a folder (one file, or the shards its index names) or [path]."""
  if not os.path.isdir(path):
    if not path.endswith(".safetensors"):
      raise ValueError(f"{path}: expected a .safetensors file or a folder holding "
                       f"{SINGLE_FILE} or {INDEX_FILE} ({WHERE_PUBLISHED})")
    return [path]
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f).get("weight_map", {}).values()))
    if not shards:
      raise ValueError(f"{index} has no weight_map (expected the index of {WHERE_PUBLISHED})")
    files = [os.path.join(path, s) for s in shards]
    for name in files:
      if not os.path.isfile(name):
        raise FileNotFoundError(f"{name}, listed in {index}, is missing: download every shard "
                                f"of {WHERE_PUBLISHED}")
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    return [single]
  raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}; expected "
                          f"{WHERE_PUBLISHED}")


def _entries(files: List[str]) -> Iterator[Tuple[str, str, np.ndarray]]:
  for name in files:  # one shard in memory at a time
    for key, value in load_state_dict(name).items():
      yield name, key, value


def import_gemma2(files: List[str], model, *, dtype=np.float32) -> Dict[str, Any]:
  """Gemma2Encoder params (nested dict of numpy arrays, `dtype`) from safetensors files in the
  transformers layout; every key used (lm_head dropped on purpose), every param filled, every
  shape checked against the module (errors name the key, the file and where it is published)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]

  def entries():
    for name, key, value in _entries(files):
      bare = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
      if bare.startswith(_DROPPED):
        continue
      target, how = flax_path(bare)
      yield (name, key, None if how == "unknown" else target, value,
             lambda v, ndim, how=how: np.asarray(v).T if how == "transpose" else np.asarray(v))

  return fill.fill_params(
      entries(), fill.param_shapes(shapes), layout="the Gemma2 layout", where=WHERE_PUBLISHED,
      hint="check num_layers and the file", model="the encoder",
      source=", ".join(files), missing_name=hf_key, dtype=dtype)


def load_gemma2(path: str, *, config_key: str = "config.text_encoder.path",
                overrides: Optional[Dict[str, Any]] = None, dtype=None):
  """(Gemma2Encoder module, params) from a Hugging Face folder or .safetensors file.

  Sizes: GEMMA2_2B, then config.json beside the weights, then `overrides` (e.g. the compute
  dtype). Params are stored in `dtype` (default bfloat16: the published weights' precision and
  what SANA runs; pass np.float32 for a float32 reference). A missing path raises
  FileNotFoundError naming config_key.
  """
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from hierdistill.models.gemma2 import GEMMA2_2B, Gemma2Encoder
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file or folder; expected "
                            f"{WHERE_PUBLISHED}")
  dtype = ml_dtypes.bfloat16 if dtype is None else dtype
  fields = {**GEMMA2_2B, **read_config(path), **(overrides or {})}
  model = Gemma2Encoder(**{"param_dtype": dtype, **fields})
  return model, import_gemma2(weight_files(path), model, dtype=dtype)
