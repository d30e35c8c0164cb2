"""Imports published SANA transformers into models.sana.SanaTransformer params (no PyTorch needed).

Published files (Hugging Face Hub):
  diffusers layout: Efficient-Large-Model/Sana_600M_512px_diffusers, Sana_1600M_1024px_diffusers,
    ... : a transformer/ folder with config.json and diffusion_pytorch_model.safetensors, or
    shards listed in diffusion_pytorch_model.safetensors.index.json. Pass the transformer/
    folder or the pipeline folder above it.
  NVlabs layout: Efficient-Large-Model/Sana_600M_512px (checkpoints/Sana_600M_512px_MultiLing.pth),
    Sana_1600M_1024px, ...: a torch.save'd {'state_dict': ...}, read by convert/torch_files.py's
    restricted unpickler. The file has no config: the sizes are read from the weight shapes and
    the head counts from the published size of that depth and width (models.sana.SANA_SIZES).

Key mapping (diffusers -> ours; torch Linear (out, in) -> kernel (in, out); Conv (O, I, kh, kw)
-> (kh, kw, I, O); 1x1 convs become Dense kernels (I, O); norms' weight -> scale):
  patch_embed.proj                                 patch_embed
  time_embed.emb.timestep_embedder.linear_{1,2}    t_embedder/mlp_{0,2}
  time_embed.linear                                t_block
  caption_projection.linear_{1,2}                  caption_projection/linear_{1,2}
  caption_norm                                     caption_norm
  transformer_blocks.{i}.scale_shift_table         blocks_{i}/scale_shift_table
  transformer_blocks.{i}.attn{1,2}.to_{q,k,v}      blocks_{i}/attn{1,2}/to_{q,k,v}
  transformer_blocks.{i}.attn{1,2}.to_out.0        blocks_{i}/attn{1,2}/to_out
  transformer_blocks.{i}.attn{1,2}.norm_{q,k}      blocks_{i}/attn{1,2}/norm_{q,k}    (qk_norm)
  transformer_blocks.{i}.ff.conv_{inverted,depth,point}   blocks_{i}/ff/conv_{...}
  scale_shift_table, proj_out                      scale_shift_table, proj_out
NVlabs -> diffusers (the renames of diffusers' scripts/convert_sana_to_diffusers.py):
  x_embedder.proj -> patch_embed.proj; t_embedder.mlp.{0,2} -> ...timestep_embedder.linear_{1,2};
  t_block.1 -> time_embed.linear; y_embedder.y_proj.fc{1,2} -> caption_projection.linear_{1,2};
  attention_y_norm -> caption_norm; blocks.{i} -> transformer_blocks.{i};
  attn.qkv (rows q | k | v) -> attn1.to_{q,k,v}; attn.proj -> attn1.to_out.0;
  attn.{q,k}_norm -> attn1.norm_{q,k}; cross_attn.q_linear -> attn2.to_q;
  cross_attn.kv_linear (rows k | v) -> attn2.to_{k,v}; cross_attn.proj -> attn2.to_out.0;
  cross_attn.{q,k}_norm -> attn2.norm_{q,k}; mlp.{inverted,depth,point}_conv.conv ->
  ff.conv_{inverted,depth,point}; final_layer.linear -> proj_out;
  final_layer.scale_shift_table -> scale_shift_table.
  Dropped on purpose: y_embedder.y_embedding (the learned null caption, unused by diffusers'
  pipeline, which encodes the empty prompt), pos_embed (a sin-cos buffer, unused at 512/1024 px),
  logvar_linear (a training-time loss weight).

Every key of the file is used (or is one of the dropped ones), every param is filled, every
shape checked; a mismatch is one line naming the key, the file and where the file is published.
Conventions: SANA's sigma is our t and its prediction noise - x is our velocity: no sign flip;
the model's time_scale (default 1000) must stay 1000 for published weights.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

from hierdistill.convert.torch_files import load_state_dict

WHERE_PUBLISHED = {
    "diffusers": ("the transformer/ folder of Efficient-Large-Model/Sana_600M_512px_diffusers "
                  "(or Sana_1600M_1024px_diffusers) on the Hugging Face Hub"),
    "original": ("checkpoints/*.pth of Efficient-Large-Model/Sana_600M_512px (or "
                 "Sana_1600M_1024px) on the Hugging Face Hub"),
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
ORIGINAL_DROPPED = ("y_embedder.y_embedding", "pos_embed", "logvar_linear.weight",
                    "logvar_linear.bias")
# Fields of the published transformers that this model fixes; an import refuses any other value.
_FIXED_CONFIG = {"attention_bias": False, "norm_elementwise_affine": False, "norm_eps": 1e-6,
                 "interpolation_scale": None, "guidance_embeds": False}

# How each array is laid out, torch -> ours: 'dense' (O, I) -> (I, O); 'conv1x1' (O, I, 1, 1)
# -> (I, O); 'conv' (O, I, kh, kw) -> (kh, kw, I, O); 'same' unchanged.
_PREFIXES = (  # (diffusers prefix, our path)
    ("patch_embed.proj", ("patch_embed",)),
    ("time_embed.emb.timestep_embedder.linear_1", ("t_embedder", "mlp_0")),
    ("time_embed.emb.timestep_embedder.linear_2", ("t_embedder", "mlp_2")),
    ("time_embed.linear", ("t_block",)),
    ("caption_projection.linear_1", ("caption_projection", "linear_1")),
    ("caption_projection.linear_2", ("caption_projection", "linear_2")),
    ("proj_out", ("proj_out",)),
)
_ORIGINAL_NAMES = (  # (diffusers prefix, NVlabs prefix, rows chunk index, number of chunks)
    ("patch_embed.proj", "x_embedder.proj", 0, 1),
    ("time_embed.emb.timestep_embedder.linear_1", "t_embedder.mlp.0", 0, 1),
    ("time_embed.emb.timestep_embedder.linear_2", "t_embedder.mlp.2", 0, 1),
    ("time_embed.linear", "t_block.1", 0, 1),
    ("caption_projection.linear_1", "y_embedder.y_proj.fc1", 0, 1),
    ("caption_projection.linear_2", "y_embedder.y_proj.fc2", 0, 1),
    ("caption_norm", "attention_y_norm", 0, 1),
    ("proj_out", "final_layer.linear", 0, 1),
    ("scale_shift_table", "final_layer.scale_shift_table", 0, 1),
)
_ORIGINAL_BLOCK_NAMES = (
    ("scale_shift_table", "scale_shift_table", 0, 1),
    ("attn1.to_q", "attn.qkv", 0, 3), ("attn1.to_k", "attn.qkv", 1, 3),
    ("attn1.to_v", "attn.qkv", 2, 3), ("attn1.to_out.0", "attn.proj", 0, 1),
    ("attn1.norm_q", "attn.q_norm", 0, 1), ("attn1.norm_k", "attn.k_norm", 0, 1),
    ("attn2.to_q", "cross_attn.q_linear", 0, 1), ("attn2.to_k", "cross_attn.kv_linear", 0, 2),
    ("attn2.to_v", "cross_attn.kv_linear", 1, 2), ("attn2.to_out.0", "cross_attn.proj", 0, 1),
    ("attn2.norm_q", "cross_attn.q_norm", 0, 1), ("attn2.norm_k", "cross_attn.k_norm", 0, 1),
    ("ff.conv_inverted", "mlp.inverted_conv.conv", 0, 1),
    ("ff.conv_depth", "mlp.depth_conv.conv", 0, 1),
    ("ff.conv_point", "mlp.point_conv.conv", 0, 1),
)


def _flax_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """(our param path, layout) for a diffusers key."""
  if key == "scale_shift_table":
    return ("scale_shift_table",), "same"
  module, leaf = key.rsplit(".", 1)
  for prefix, path in _PREFIXES:
    if module == prefix:
      if prefix == "patch_embed.proj" and leaf == "weight":
        return path + ("kernel",), "conv"
      return path + ("kernel" if leaf == "weight" else "bias",), (
          "dense" if leaf == "weight" else "same")
  if key == "caption_norm.weight":
    return ("caption_norm", "scale"), "same"
  match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
  if match is None:
    raise KeyError(key)
  block, rest = f"blocks_{match.group(1)}", match.group(2)
  if rest == "scale_shift_table":
    return (block, "scale_shift_table"), "same"
  module, leaf = rest.rsplit(".", 1)
  parts = module.replace("to_out.0", "to_out").split(".")
  if parts[-1] in ("norm_q", "norm_k"):
    return (block, *parts, "scale"), "same"
  if leaf == "bias":
    return (block, *parts, "bias"), "same"
  layout = {"conv_inverted": "conv1x1", "conv_point": "conv1x1", "conv_depth": "conv"}.get(
      parts[-1], "dense")
  return (block, *parts, "kernel"), layout


def _torch_shape(shape: Tuple[int, ...], layout: str) -> Tuple[int, ...]:
  """The torch shape of an array that has `shape` here."""
  if layout == "dense":
    return tuple(reversed(shape))
  if layout == "conv1x1":
    return (shape[1], shape[0], 1, 1)
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _to_ours(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "dense":
    return value.T
  if layout == "conv1x1":
    return value.reshape(value.shape[0], value.shape[1]).T
  if layout == "conv":
    return value.transpose(2, 3, 1, 0)
  return value


def param_shapes(model) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{our param path: shape} of a SanaTransformer, from jax.eval_shape (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  p = model.patch_size
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, p, p, model.in_channels),
                                                          jnp.float32),
      None, jax.ShapeDtypeStruct((1,), jnp.float32),
      {"embeddings": jax.ShapeDtypeStruct((1, 1, model.caption_channels), jnp.float32),
       "mask": jax.ShapeDtypeStruct((1, 1), jnp.int32)})["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def diffusers_layout(model) -> Dict[str, Tuple[Tuple[str, ...], str, Tuple[int, ...]]]:
  """{diffusers key: (our path, layout, torch shape)} of every param of a teacher model."""
  if model.interval_conditioning:
    raise ValueError("the SANA importer builds a teacher: pass a model with "
                     "interval_conditioning=False (a student is then made by "
                     "init_student_from_teacher)")
  ours = param_shapes(model)
  keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "caption_norm.weight",
          "scale_shift_table", "proj_out.weight", "proj_out.bias"]
  for prefix, _ in _PREFIXES[1:-1]:
    keys += [prefix + ".weight", prefix + ".bias"]
  for i in range(model.depth):
    b = f"transformer_blocks.{i}."
    keys.append(b + "scale_shift_table")
    keys += [b + f"attn1.to_{n}.weight" for n in "qkv"]
    keys += [b + f"attn2.to_{n}.{leaf}" for n in "qkv" for leaf in ("weight", "bias")]
    keys += [b + f"attn{j}.to_out.0.{leaf}" for j in (1, 2) for leaf in ("weight", "bias")]
    if model.qk_norm:
      keys += [b + f"attn{j}.norm_{n}.weight" for j in (1, 2) for n in "qk"]
    keys += [b + "ff.conv_inverted.weight", b + "ff.conv_inverted.bias",
             b + "ff.conv_depth.weight", b + "ff.conv_depth.bias", b + "ff.conv_point.weight"]
  layout = {}
  for key in keys:
    path, how = _flax_path(key)
    layout[key] = (path, how, _torch_shape(ours[path], how))
  if len(layout) != len(ours):  # the table above and the module must describe the same tree
    missing = sorted("/".join(p) for p in set(ours) - {v[0] for v in layout.values()})
    raise AssertionError(f"convert/sana.py does not map {missing}")
  return layout


def _error(message: str, path: str, kind: str) -> ValueError:
  return ValueError(f"{message} in {path} (expected the {kind} layout of "
                    f"{WHERE_PUBLISHED[kind]})")


def import_sana(state_dict: Mapping[str, np.ndarray], model, *, layout: str = "diffusers",
                path: str = "<state dict>", dtype=np.float32) -> Dict[str, Any]:
  """SanaTransformer params (a nested dict of numpy arrays) from a published state dict.

  layout: 'diffusers' (SanaTransformer2DModel keys) or 'original' (NVlabs .pth keys).
  model: the SanaTransformer the params are for (a teacher), sized like the file.
  """
  if layout not in WHERE_PUBLISHED:
    raise ValueError(f"unknown SANA layout {layout!r}; choose from {tuple(WHERE_PUBLISHED)}")
  expected = diffusers_layout(model)
  used = set()
  flat = {}
  for key, (target, how, shape) in expected.items():
    if layout == "diffusers":
      src, chunk, chunks = key, 0, 1
    else:
      src, chunk, chunks = original_name(key)
    if src not in state_dict:
      raise _error(f"missing key {src!r}", path, layout)
    value = np.asarray(state_dict[src])
    full = (shape[0] * chunks,) + shape[1:]
    if tuple(value.shape) != full:
      raise _error(f"{src} has shape {tuple(value.shape)}, the model expects {full} (check the "
                   "model sizes: depth, hidden_size, heads, mlp_ratio, caption_channels, "
                   "qk_norm)", path, layout)
    used.add(src)
    value = value[chunk * shape[0]:(chunk + 1) * shape[0]]
    flat[target] = _to_ours(value.astype(np.float32), how).astype(dtype)
  dropped = ORIGINAL_DROPPED if layout == "original" else ()
  unexpected = [k for k in state_dict if k not in used and k not in dropped]
  if unexpected:
    raise _error(f"unexpected key {unexpected[0]!r} ({len(unexpected)} in all; is the model "
                 f"depth {model.depth}, qk_norm {model.qk_norm}?)", path, layout)
  return traverse_util.unflatten_dict(flat)


def original_name(key: str) -> Tuple[str, int, int]:
  """(NVlabs key, chunk of its rows, number of chunks) holding a diffusers key's array."""
  # The adaLN tables are parameters of their module, not of a child layer.
  module, leaf = (key, "") if key.endswith("scale_shift_table") else key.rsplit(".", 1)
  match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
  table, prefix = (_ORIGINAL_BLOCK_NAMES, f"blocks.{match.group(1)}.") if match else (
      _ORIGINAL_NAMES, "")
  module = match.group(2) if match else module
  for new, old, chunk, chunks in table:
    if module == new:
      return prefix + old + (f".{leaf}" if leaf else ""), chunk, chunks
  raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Files and folders.


def read_config(folder: str) -> Dict[str, Any]:
  """SanaTransformer fields from a diffusers transformer/config.json; refuses configs whose
  weights this model does not hold (Sprint's guidance embedder, 2K/4K position embeddings)."""
  cfg_path = os.path.join(folder, "config.json")
  with open(cfg_path) as f:
    raw = json.load(f)
  for key, value in _FIXED_CONFIG.items():
    if raw.get(key, value) != value:
      raise ValueError(f"{cfg_path}: {key}={raw[key]!r} is not supported (this SANA holds "
                       f"{key}={value!r}: the 512/1024 px teachers of "
                       f"{WHERE_PUBLISHED['diffusers']})")
  heads, head_dim = raw.get("num_attention_heads", 70), raw.get("attention_head_dim", 32)
  hidden = heads * head_dim
  cross_heads = raw.get("num_cross_attention_heads", 20)
  cross_dim = raw.get("cross_attention_head_dim", 112)
  if cross_heads * cross_dim != hidden or raw.get("cross_attention_dim", hidden) != hidden:
    raise ValueError(f"{cfg_path}: cross-attention of width {cross_heads} x {cross_dim} over "
                     f"{raw.get('cross_attention_dim')} channels; this SANA needs both equal to "
                     f"the hidden size {hidden}")
  qk_norm = raw.get("qk_norm")
  if qk_norm not in (None, "rms_norm_across_heads"):
    raise ValueError(f"{cfg_path}: qk_norm={qk_norm!r} is not supported (None or "
                     "'rms_norm_across_heads')")
  out_channels = raw.get("out_channels") or raw.get("in_channels", 32)
  if out_channels != raw.get("in_channels", 32):
    raise ValueError(f"{cfg_path}: out_channels={out_channels} differs from in_channels")
  return dict(in_channels=raw.get("in_channels", 32), patch_size=raw.get("patch_size", 1),
              hidden_size=hidden, depth=raw.get("num_layers", 20), num_heads=heads,
              cross_num_heads=cross_heads, mlp_ratio=raw.get("mlp_ratio", 2.5),
              caption_channels=raw.get("caption_channels", 2304),
              qk_norm=qk_norm is not None)


def infer_original_fields(state_dict: Mapping[str, np.ndarray], path: str) -> Dict[str, Any]:
  """SanaTransformer fields from the shapes of an NVlabs state dict (heads from SANA_SIZES)."""
  from hierdistill.models.sana import SANA_SIZES  # pylint: disable=g-import-not-at-top
  for key in ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight",
              "blocks.0.mlp.point_conv.conv.weight"):
    if key not in state_dict:
      raise _error(f"missing key {key!r}", path, "original")
  hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
  depth = sum(1 for k in state_dict if re.fullmatch(r"blocks\.\d+\.scale_shift_table", k))
  fields = dict(in_channels=int(channels), patch_size=int(patch), hidden_size=int(hidden),
                depth=depth, caption_channels=int(state_dict["y_embedder.y_proj.fc1.weight"]
                                                  .shape[1]),
                mlp_ratio=state_dict["blocks.0.mlp.point_conv.conv.weight"].shape[1] / hidden,
                qk_norm="blocks.0.attn.q_norm.weight" in state_dict)
  for size in SANA_SIZES.values():
    if size["hidden_size"] == hidden and size["depth"] == depth:
      fields.update(num_heads=size["num_heads"], cross_num_heads=size["cross_num_heads"])
  return fields


def variant_name(name: str, variant: Optional[str]) -> str:
  """diffusers' file name of a weights variant: 'diffusion_pytorch_model.fp16.safetensors',
  'diffusion_pytorch_model.safetensors.index.fp16.json'."""
  if variant is None:
    return name
  stem, ext = name.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


def _variants_in(folder: str) -> List[str]:
  found = set()
  for name in os.listdir(folder):
    if name.startswith("diffusion_pytorch_model."):
      found |= set(name.split(".")[1:-1]) - {"safetensors", "bin", "index"}
  return sorted(found)


def _read_weights(folder: str, variant: Optional[str] = None
                  ) -> Tuple[Dict[str, np.ndarray], str]:
  """The state dict of a diffusers folder (one file or the shards its index lists)."""
  names = [variant_name(n, variant) for n in (INDEX_FILE,) + WEIGHT_FILES]
  index = os.path.join(folder, names[0])
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state_dict = {}
    for shard in shards:
      state_dict.update(load_state_dict(os.path.join(folder, shard)))
    return state_dict, index
  for name in names[1:]:
    if os.path.isfile(os.path.join(folder, name)):
      return load_state_dict(os.path.join(folder, name)), os.path.join(folder, name)
  hint = ""
  variants = _variants_in(folder)
  if variants:
    hint = f"; it holds the variants {variants}: pass variant={variants[0]!r}"
  raise FileNotFoundError(f"{folder} has none of {', '.join(names)}{hint} (expected "
                          f"{WHERE_PUBLISHED['diffusers']})")


def load_sana(path: str, *, config_key: str = "config.model.checkpoint",
              overrides: Optional[Mapping[str, Any]] = None, variant: Optional[str] = None,
              dtype=np.float32):
  """(SanaTransformer teacher, params) from a diffusers folder or an NVlabs .pth file.

  path: a diffusers pipeline folder (its transformer/ is read), a transformer/ folder, or a
  .pth. variant: diffusers' weights variant of the folder ('fp16', 'bf16'; None: the plain
  files). overrides: extra model fields (dtype, remat, feature_layers; for a .pth of unpublished
  size also num_heads and cross_num_heads). A missing path raises naming config_key.
  """
  from hierdistill.models.sana import SanaTransformer  # pylint: disable=g-import-not-at-top
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"{config_key}={path!r}: no such file or folder; expected "
                            f"{WHERE_PUBLISHED['diffusers']}, or {WHERE_PUBLISHED['original']}")
  if os.path.isdir(path):
    folder = os.path.join(path, "transformer") if os.path.isdir(
        os.path.join(path, "transformer")) else path
    if not os.path.isfile(os.path.join(folder, "config.json")):
      raise FileNotFoundError(f"{config_key}={path!r} has no config.json (expected "
                              f"{WHERE_PUBLISHED['diffusers']})")
    fields, layout = read_config(folder), "diffusers"
    state_dict, source = _read_weights(folder, variant)
  else:
    state_dict = load_state_dict(path, prefer=("state_dict", "ema", "model"))
    fields, layout, source = infer_original_fields(state_dict, path), "original", path
  fields.update(overrides or {})
  for name in ("num_heads", "cross_num_heads"):
    if name not in fields:
      raise ValueError(f"{path}: depth {fields['depth']} and width {fields['hidden_size']} are "
                       f"no published SANA size: pass overrides={{'{name}': ...}}")
  model = SanaTransformer(**fields)
  return model, import_sana(state_dict, model, layout=layout, path=source, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The other way: our params as a diffusers transformer folder.

_TO_TORCH = {"dense": lambda v: v.T, "conv1x1": lambda v: v.T.reshape(v.shape[1], v.shape[0], 1, 1),
             "conv": lambda v: v.transpose(3, 2, 0, 1), "same": lambda v: v}


def to_diffusers(params: Mapping[str, Any], model) -> Dict[str, np.ndarray]:
  """{diffusers key: float32 array} of a teacher model's params (import_sana run backwards)."""
  flat = traverse_util.flatten_dict(params.unfreeze() if hasattr(params, "unfreeze")
                                    else dict(params))
  return {key: np.ascontiguousarray(_TO_TORCH[how](np.asarray(flat[path], np.float32)))
          for key, (path, how, _) in diffusers_layout(model).items()}


def diffusers_config(model, *, sample_size: Optional[int] = None) -> Dict[str, Any]:
  """SanaTransformer2DModel's config.json for a teacher model. timestep_scale carries our
  time_scale: the pipeline passes 1000 sigma times it, and the model embeds time_scale t."""
  heads, cross = int(model.num_heads), int(model.cross_num_heads)
  config = {"_class_name": "SanaTransformer2DModel", "in_channels": model.in_channels,
            "out_channels": model.in_channels, "patch_size": model.patch_size,
            "num_layers": model.depth, "num_attention_heads": heads,
            "attention_head_dim": model.hidden_size // heads,
            "num_cross_attention_heads": cross,
            "cross_attention_head_dim": model.hidden_size // cross,
            "cross_attention_dim": model.hidden_size, "mlp_ratio": model.mlp_ratio,
            "caption_channels": model.caption_channels, "attention_bias": False,
            "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "qk_norm": "rms_norm_across_heads" if model.qk_norm else None,
            "timestep_scale": float(model.time_scale) / 1000.0}
  if sample_size is not None:  # the latent size the pipeline draws by default
    config["sample_size"] = int(sample_size)
  return config


def write_diffusers(folder: str, model, params: Mapping[str, Any], *,
                    sample_size: Optional[int] = None) -> str:
  """A teacher model's params as a diffusers transformer folder (config.json and
  diffusion_pytorch_model.safetensors); returns the weights file's path."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(diffusers_config(model, sample_size=sample_size), f, indent=2)
  path = os.path.join(folder, WEIGHT_FILES[0])
  save_file(to_diffusers(params, model), path + ".tmp")
  os.replace(path + ".tmp", path)  # a reader never sees half a file
  return path
