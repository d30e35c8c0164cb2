"""An exported generator's files: one directory that loads with Generator.load(DIR) without the
run's workdir or its training config. This module writes and reads the files (write, read);
generator.export_run and generator.write_export make an export from a run (launch/export.py).

  model.safetensors        the network's params, float32. A label DiT (the DiT/SiT module
                           tree) in the published DiT/SiT key layout plus the student's
                           interval_embedder.mlp.{0,2}.* (convert/dit_layout.py), so the
                           importer of published checkpoints reads it; any other network under
                           its Flax paths ('blocks_0/attn/qkv/kernel').
  null_condition.safetensors  text models: the empty prompt's embeddings (L, D) and mask (L,)
  vae.safetensors          latent models: the VAE's params under its Flax paths (config.json:
                           its fields, latent scaling and statistics included)
  config.json              format and version, the network's class and fields, the sample
                           shape, the condition kind and its null, the time mapping and other
                           conventions, the VAE and its scaling, the teacher sampler, the
                           SHA-256 of every file, where it came from
  eval.json, eval.md       the run's evaluation table, when the run has one
  samples.png              a grid drawn by the exported generator itself
  README.md                a short model card

Loading checks the format, every file's presence and checksum, and that the params fit the
network the config describes; anything wrong is ConfigError, one line naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hierdistill import conditions as cond_lib
from hierdistill import sources
from hierdistill.config_checks import ConfigError
from hierdistill.convert import dit_layout

FORMAT = "hierdistill-generator"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NULL_FILE = "null_condition.safetensors"
VAE_FILE = "vae.safetensors"
GRID_FILE = "samples.png"
GRID_SEED = 0


def is_export(path: str) -> bool:
  """Whether path holds an exported generator (its config.json says this FORMAT)."""
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


# -- writing ---------------------------------------------------------------------------------------

def write(gen, out_dir: str, *, run_config, eval_dir: Optional[str] = None) -> dict:
  """Writes the generator's weights, null condition, VAE, eval table and config.json into
  out_dir (see the module docstring); the sample grid and model card follow once the export
  loads (generator.write_export). Returns config.json's contents."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model = gen.model
  params = jax.device_get(gen.params)
  published = dit_layout.has_published_layout(model)
  tensors = (dit_layout.to_published(params, model) if published
             else dit_layout.flat_params(params))
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE))
  files = [WEIGHTS_FILE]
  if gen.is_text:
    save_file({"embeddings": gen.conditions.null_embeddings, "mask": gen.conditions.null_mask},
              os.path.join(out_dir, NULL_FILE))
    files.append(NULL_FILE)
  vae = {}
  if gen.decoder is not None:
    vae_model, vae_params = gen.decoder
    save_file(dit_layout.flat_params(jax.device_get(vae_params)),
              os.path.join(out_dir, VAE_FILE))
    files.append(VAE_FILE)
    run_vae = run_config.get("vae") or {}
    vae = {"file": VAE_FILE, "class": type(vae_model).__name__,
           "fields": module_fields(vae_model), "kind": run_vae.get("kind", "sd"),
           "variant": run_vae.get("variant", ""),
           "random_init": bool(run_vae.get("random_init", False)),
           "scaling_factor": float(vae_model.scaling_factor),
           "latents": "the model's x = scale * z + shift of the VAE latent z: scale = "
                      "scaling_factor / latent_std, shift = -latent_mean * scale (per channel; "
                      "0 and 1 when absent), models/vae.latent_affine"}
  for name, dest in (("metrics.json", "eval.json"), ("metrics.md", "eval.md")):
    if eval_dir and os.path.isfile(os.path.join(eval_dir, name)):
      shutil.copyfile(os.path.join(eval_dir, name), os.path.join(out_dir, dest))

  meta = {
      "format": FORMAT, "version": VERSION, "role": gen.role,
      "model": {"class": type(model).__name__, "name": _registry_name(model),
                "fields": module_fields(model)},
      "shape": list(gen.shape),
      "conditions": _describe_conditions(gen.conditions),
      "data": {"name": gen.data_name},
      "conventions": conventions(model, gen.role),
      "weights": {"file": WEIGHTS_FILE, "dtype": "float32",
                  "layout": ("published DiT/SiT keys" + (" + interval_embedder.*"
                                                         if gen.role == "student" else ""))
                  if published else "flax paths",
                  "kind": dit_layout.kind_of(model) if published else None},
      "vae": vae,
      "sample": _jsonable(gen.sample_config),
      "source": source_record(gen.info, run_config),
  }
  meta["sha256"] = {f: _sha256(os.path.join(out_dir, f)) for f in files}
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)

  return meta


def config_hash(run_config) -> str:
  """The first 12 hex digits of the SHA-256 of the run's config as sorted JSON: names the run
  in a card meant for other people, where a workdir path would mean nothing."""
  if hasattr(run_config, "to_dict"):
    run_config = run_config.to_dict()
  text = json.dumps(_jsonable(dict(run_config or {})), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def source_record(info: dict, run_config) -> dict:
  """Where an export came from, as others can use it: the experiment, the hash of its config,
  the stage and step. No path of the machine that trained it (the export travels)."""
  return {"experiment": info.get("experiment", ""), "stage": info.get("stage"),
          "step": info.get("step"),
          "config_sha256": info.get("config_sha256") or config_hash(run_config),
          "exported": time.strftime("%Y-%m-%d %H:%M:%S")}


def module_fields(model) -> dict:
  """The network's dataclass fields, JSON-ready (dtypes by name)."""
  out = {}
  for f in dataclasses.fields(model):
    if f.name in ("name", "parent"):
      continue
    out[f.name] = _jsonable(getattr(model, f.name))
  return out


def _registry_name(model) -> str:
  from hierdistill.models.registry import MODELS  # pylint: disable=g-import-not-at-top
  for name, cls in MODELS.items():
    if type(model) is cls:  # pylint: disable=unidiomatic-typecheck
      return name
  raise ValueError(f"{type(model).__name__} is not in models/registry.MODELS: it cannot be "
                   "exported by name.")


def conventions(model, role: str) -> dict:
  """The conventions a user of the weights needs (METHOD.md), in words."""
  scale = float(getattr(model, "time_scale", 1.0))
  flip = bool(getattr(model, "time_flip", False))
  out = {
      "path": "z_t = (1 - t) x + t e; t = 1 is noise, t = 0 data",
      "prediction": ("mean velocity u(z, r, t | c) over [r, t]; one step: x = e - u(e, 0, 1 | c)"
                     if role == "student" else
                     "velocity v(z, t | c) = e - x; sample by integrating dz/dt = v from t = 1 "
                     "to 0"),
      "time_embedder_input": f"{scale:g} * {'(1 - t)' if flip else 't'}",
      "layout": "NHWC",
  }
  if role == "student":
    out["interval_embedder_input"] = f"{float(getattr(model, 'interval_scale', 1.0)):g} * (t - r)"
  return out


def _describe_conditions(kind) -> dict:
  if kind.kind == "labels":
    return {"kind": "labels", "num_classes": kind.num_classes, "null_label": kind.num_classes,
            "describe": kind.describe()}
  return {"kind": "text", "length": kind.length, "width": kind.width, "null": NULL_FILE,
          "null_prompt": "", "describe": kind.describe()}


def grid_conditions(gen, n: int):
  """Labels cycling through the classes, or the data source's example prompts (a row each)."""
  if gen.is_text:
    config = ml_collections.ConfigDict({"data": {"name": gen.data_name}})
    prompts = list(sources.source_class(gen.data_name).example_prompts(config)) or [""]
    columns = max(n // len(prompts), 1)  # each prompt a row
    return [p for p in prompts for _ in range(columns)]
  return list(np.arange(n) % max(gen.conditions.num_classes, 1))


def save_samples(samples: np.ndarray, path: str, gen=None, asked=None) -> None:
  """A PNG grid of images (captioned rows for prompts), or a scatter of 2-D points; .npz with
  the samples and what was asked."""
  from hierdistill.evaluation import grids  # pylint: disable=g-import-not-at-top
  if path.endswith(".npz"):
    extra = {}
    if asked is not None:
      extra["prompts" if isinstance(asked[0], str) else "labels"] = np.asarray(asked)
    np.savez(path, samples=samples, **extra)
  elif samples.ndim == 2:
    grids.scatter_png([samples], ["red"], path)
  elif asked is not None and isinstance(asked[0], str):
    # Consecutive samples of one prompt form a row, the prompt printed under it.
    grids.save_captioned_grid(samples, list(asked), path)
  else:
    grids.save_image_grid(samples, path)


def model_card(meta: dict, out_dir: str, name: Optional[str] = None) -> str:
  """The README of an export in out_dir; name: the directory's final name (the card is written
  before a temporary directory takes it), used in the snippet as a path relative to where the
  user keeps the export."""
  name = name or os.path.basename(os.path.normpath(out_dir))
  cond = meta["conditions"]
  fields = meta["model"]["fields"]
  size = ", ".join(f"{k} {fields[k]}" for k in ("hidden_size", "depth", "num_heads",
                                                 "patch_size", "width") if k in fields)
  eval_md = os.path.join(out_dir, "eval.md")
  table = open(eval_md).read().strip() if os.path.isfile(eval_md) else "(the run had no eval)"
  kind = {"student": "a one-step generator distilled by Hierarchical Distillation (stage 1 "
                     "MeanFlow trajectory distillation, stage 2 DMD + AWD)",
          "teacher": "a flow-matching teacher (sample it in N steps with guidance)"}[meta["role"]]
  ask = ("prompts (the data source's vocabulary)" if cond["kind"] == "text" else
         f"class labels 0..{cond['num_classes'] - 1}")
  example = '["a bold, upright seven"]' if cond["kind"] == "text" else "[3, 7]"
  return f"""# {meta['source'].get('experiment') or 'hierdistill'} generator ({meta['role']})

This is {kind}: a {meta['model']['class']} ({size}) drawing samples of shape
{tuple(meta['shape'])} from {ask}{', decoded by its VAE' if meta['vae'] else ''}.

```python
import jax, hierdistill
gen = hierdistill.Generator.load("{name}")
images = gen(jax.random.PRNGKey(0), {example}, num_steps=1)
```

Weights: `{WEIGHTS_FILE}` ({meta['weights']['layout']}); conventions, condition and VAE in
`config.json`. Source: experiment {meta['source'].get('experiment') or '?'} (config SHA-256
{meta['source'].get('config_sha256', '?')}), {meta['source'].get('stage', '?')} stage, step
{meta['source'].get('step', '?')}.
`{GRID_FILE}`: samples of this export, seed {GRID_SEED}.

## Evaluation of the run

{table}
"""


# -- reading -------------------------------------------------------------------------------------

def read_meta(path: str) -> dict:
  """The export's config.json, checked: format, version, files present and intact."""
  cfg_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(cfg_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{cfg_path} is unreadable ({type(e).__name__}); export the run "
                      "again.") from None
  if meta.get("format") != FORMAT:
    raise ConfigError(f"{path} is not an exported generator ({CONFIG_FILE} has no "
                      f"format={FORMAT!r}); give the --out of launch/export.py.")
  if meta.get("version") != VERSION:
    raise ConfigError(f"{path} is an export of format version {meta.get('version')}; this "
                      f"hierdistill reads version {VERSION}: export the run again with it.")
  for name, digest in meta.get("sha256", {}).items():
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise ConfigError(f"{file} is missing from the export; copy the whole directory, or "
                        "export the run again.")
    if _sha256(file) != digest:
      raise ConfigError(f"{file} is damaged (its SHA-256 differs from the one in "
                        f"{CONFIG_FILE}); copy it again, or export the run again.")
  return meta


def read(path: str) -> dict:
  """What a Generator is made of, read from an export: the keyword arguments of
  generator.Generator but devices (Generator.load builds it)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from hierdistill.models import registry  # pylint: disable=g-import-not-at-top
  meta = read_meta(path)
  try:
    m = meta["model"]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in m["fields"].items()}
    model = registry.build({"name": m["name"], **fields})
    shape = tuple(meta["shape"])
    conditions = _conditions(meta["conditions"], path)
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{os.path.join(path, CONFIG_FILE)} does not describe a network this "
                      f"hierdistill builds ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "export the run again.") from None
  weights = os.path.join(path, meta["weights"]["file"])
  try:
    tensors = load_file(weights)
  except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own types
    first = str(e).splitlines()[0] if str(e) else ""
    raise ConfigError(f"{weights} does not read as safetensors ({type(e).__name__}: {first}); "
                      "export the run again.") from None
  published = meta["weights"]["layout"].startswith("published")
  params = (dit_layout.from_published(tensors, model) if published
            else dit_layout.unflat_params(tensors))
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + shape, jnp.float32),
      jnp.ones((1,)) if model.interval_conditioning else None, jnp.ones((1,)),
      jax.tree.map(jnp.asarray, conditions.example(1)))["params"])
  params = _fit(params, abstract, weights)
  decoder = _vae(meta.get("vae") or {}, path)
  info = dict(meta.get("source", {}), export=os.path.abspath(path))
  return dict(model=model, params=params, conditions=conditions, shape=shape,
              role=meta["role"], sample_config=meta["sample"], data_name=meta["data"]["name"],
              model_config={"name": m["name"], **fields}, decoder=decoder, info=info)


def _conditions(desc: dict, path: str):
  if desc["kind"] == "labels":
    return cond_lib.Labels(int(desc["num_classes"]))
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  null = load_file(os.path.join(path, desc["null"]))
  return cond_lib.Text(null["embeddings"], null["mask"])


def _fit(params, abstract, where: str):
  """params cast to the network's dtypes; ConfigError naming the first parameter missing,
  extra or of another shape."""
  from hierdistill import sharding as shard_lib  # pylint: disable=g-import-not-at-top
  got = {shard_lib.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {shard_lib.path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for name, a in want.items():
    if name not in got:
      raise ConfigError(f"{where} does not fit the network in config.json: it lacks parameter "
                        f"{name!r}; export the run again.")
    if tuple(got[name].shape) != tuple(a.shape):
      raise ConfigError(f"{where} does not fit the network in config.json: parameter {name!r} "
                        f"has shape {tuple(got[name].shape)} there but {tuple(a.shape)} in the "
                        "network; export the run again.")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ConfigError(f"{where} does not fit the network in config.json: it has parameter "
                      f"{extra[0]!r}, which the network lacks; export the run again.")
  return jax.tree.map(lambda a, s: np.asarray(a, s.dtype),
                      jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract),
                                                   [got[n] for n in want]), abstract)


def _vae(info: dict, path: str):
  """(AutoencoderKL, params) stored in the export, checked against its fields."""
  if not info:
    return None
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from hierdistill.models.registry import DTYPES  # pylint: disable=g-import-not-at-top
  from hierdistill.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top
  fields = {k: (tuple(v) if isinstance(v, list) else
                DTYPES[v] if k in ("dtype", "param_dtype") and isinstance(v, str) else v)
            for k, v in info["fields"].items()}
  file = os.path.join(path, info["file"])
  try:
    model = AutoencoderKL(**fields)
    params = dit_layout.unflat_params(load_file(file))
  except Exception as e:  # pylint: disable=broad-except  # bad fields or a bad file
    raise ConfigError(f"{file} and the VAE of config.json do not load ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); export the run again."
                      ) from None
  size = 4 * model.downsampling_factor
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, size, size, 3)))["params"])
  return model, _fit(params, abstract, file)


# -- helpers -------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  try:
    return jnp.dtype(value).name  # dtype fields
  except TypeError:
    return str(value)
