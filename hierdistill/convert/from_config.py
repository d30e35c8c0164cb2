"""The published files an ImageNet run reads, found and loaded from its config.

`check_files(config)` runs before anything compiles: the first missing file raises
FileNotFoundError with one line naming the config key, the path it looked at, and where such a
file is published. The loaders then import each file (convert/*.py) or, where the config allows
it for tests (vae.random_init, eval.random_inception), make random weights.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from hierdistill.convert import dit as convert_dit
from hierdistill.convert import inception as convert_inception
from hierdistill.convert import lightningdit as convert_lightningdit
from hierdistill.convert import vae as convert_vae
from hierdistill.convert import vavae as convert_vavae
from hierdistill.models import block_stack

# config.teacher.checkpoint_kind -> where such a file is published (convert/dit.py's kinds, and
# LightningDiT's own importer).
TEACHER_PUBLISHED = {**convert_dit.WHERE_PUBLISHED,
                     "lightningdit": convert_lightningdit.WHERE_PUBLISHED}
# config.vae.kind: 'sd' (a diffusers AutoencoderKL folder) or 'vavae' (LightningDiT's VA-VAE .pt
# in LDM's layout, plus its per-channel latent statistics, config.vae.stats_path).
VAE_KINDS = ("sd", "vavae")

REFERENCE_PUBLISHED = ("VIRTUAL_imagenet256_labeled.npz, linked from the evaluations README of "
                       "openai/guided-diffusion (ADM's reference batches)")


def required_files(config) -> List[Tuple[str, str, str]]:
  """(config key, path, where published) of each file this config's stages will read."""
  stages = tuple(config.stages)
  out = []
  needs_teacher = any(s in stages for s in ("trajectory", "distribution", "eval"))
  kind = config.teacher.get("checkpoint_kind", "sit")
  if needs_teacher and "teacher" not in stages and "vae" in config:
    # An ImageNet config without a teacher stage distils the published teacher.
    out.append(("config.teacher.init_checkpoint", config.teacher.get("init_checkpoint", ""),
                TEACHER_PUBLISHED.get(kind, kind)))
  # Every stage draws sample grids, decoded by the VAE; the evaluation decodes every sample.
  if "vae" in config and not config.vae.random_init:
    if config.vae.get("kind", "sd") == "vavae":
      out.append(("config.vae.path", config.vae.path, convert_vavae.WHERE_PUBLISHED))
    else:
      out.append(("config.vae.path", config.vae.path, convert_vae.WHERE_PUBLISHED))
  if "vae" in config and config.vae.get("kind", "sd") == "vavae" and (
      not config.vae.random_init or config.vae.get("stats_path")):
    out.append(("config.vae.stats_path", config.vae.get("stats_path", ""),
                convert_vavae.STATS_PUBLISHED))
  if "eval" in stages and "inception_weights" in config.eval:
    if not config.eval.random_inception:
      out.append(("config.eval.inception_weights", config.eval.inception_weights,
                  convert_inception.WHERE_PUBLISHED))
    if not config.data.get("mock_num_examples", 0):
      out.append(("config.eval.reference_batch", config.eval.reference_batch,
                  REFERENCE_PUBLISHED))
  return out


def check_files(config) -> None:
  """Raises ConfigError (one line: key, path, where published) for the first missing file."""
  from hierdistill.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  if "vae" in config and config.vae.get("kind", "sd") not in VAE_KINDS:
    raise ConfigError(f"config.vae.kind={config.vae.kind!r}; choose from {VAE_KINDS} ('sd': a "
                      "diffusers AutoencoderKL folder, 'vavae': LightningDiT's VA-VAE .pt)")
  for key, path, where in required_files(config):
    if not path or not os.path.exists(path):
      raise ConfigError(f"{key}={path!r}: no such file; expected {where}")


def vae_fields(config) -> Dict[str, Any]:
  fields = dict(block_out_channels=tuple(config.vae.sizes.block_out_channels),
                layers_per_block=int(config.vae.sizes.layers_per_block),
                norm_num_groups=int(config.vae.sizes.norm_num_groups),
                scaling_factor=float(config.vae.scaling_factor))
  for key in ("latent_channels", "attention_levels"):  # VA-VAE's (SD-VAE's defaults otherwise)
    if key in config.vae.sizes:
      value = config.vae.sizes[key]
      fields[key] = tuple(value) if key == "attention_levels" else int(value)
  return fields


def latent_stats(config):
  """(mean, std) of VA-VAE's latents_stats.pt (config.vae.stats_path) as tuples, or
  (None, None) for a VAE without per-channel statistics."""
  if config.vae.get("kind", "sd") != "vavae" or not config.vae.get("stats_path"):
    return None, None
  channels = int(config.vae.sizes.get("latent_channels", 32))
  mean, std = convert_vavae.load_latent_stats(config.vae.stats_path, channels=channels)
  return tuple(float(a) for a in mean), tuple(float(a) for a in std)


def latent_affine(config):
  """(scale, shift) numpy: the model's x = scale * z + shift of an unscaled VAE latent z (a
  scalar scaling_factor for SD-VAE; per channel for VA-VAE: models/vae.latent_affine)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  mean, std = latent_stats(config)
  if mean is None:
    return float(config.vae.scaling_factor), 0.0
  scale = float(config.vae.scaling_factor) / np.asarray(std, np.float32)
  return scale.astype(np.float32), (-np.asarray(mean, np.float32) * scale).astype(np.float32)


def load_vae(config, seed: int = 0):
  """(AutoencoderKL, params): the published VAE, or random weights with vae.random_init."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hierdistill.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top
  kind = config.vae.get("kind", "sd")
  if kind not in VAE_KINDS:
    raise ValueError(f"config.vae.kind={kind!r}; choose from {VAE_KINDS}")
  mean, std = latent_stats(config)
  if config.vae.random_init:
    model = AutoencoderKL(**vae_fields(config), latent_mean=mean, latent_std=std)
    return model, random_vae_params(model, seed)
  if kind == "vavae":
    # No scaling factor of its own: config.vae.scaling_factor is LightningDiT's
    # latent_multiplier (1.0), applied after the per-channel normalisation.
    model, params = convert_vavae.load_vavae(config.vae.path, config_key="config.vae.path")
    return model.clone(scaling_factor=float(config.vae.scaling_factor), latent_mean=mean,
                       latent_std=std), params
  model, params = convert_vae.load_vae(config.vae.path, config_key="config.vae.path")
  if abs(model.scaling_factor - float(config.vae.scaling_factor)) > 1e-7:
    raise ValueError(f"config.vae.scaling_factor={config.vae.scaling_factor} but "
                     f"{config.vae.path} says {model.scaling_factor}: the teacher was trained "
                     "with one of them; set the key to the teacher's")
  return model.clone(scaling_factor=float(config.vae.scaling_factor)), params


def load_inception(config, seed: int = 0):
  """(FIDInceptionV3, params): the published FID weights, or random ones with
  eval.random_inception (then the numbers are not FID)."""
  from hierdistill.evaluation import inception  # pylint: disable=g-import-not-at-top
  if config.eval.random_inception:
    model = inception.FIDInceptionV3(width=float(config.eval.inception_width))
    return model, inception.random_params(model, seed)
  if float(config.eval.inception_width) != 1.0:
    raise ValueError(f"config.eval.inception_width={config.eval.inception_width}: the published "
                     "weights need 1.0")
  params = convert_inception.load_inception(config.eval.inception_weights,
                                            config_key="config.eval.inception_weights")
  return inception.FIDInceptionV3(), params


def random_vae_params(model, seed: int = 0) -> Dict[str, Any]:
  """Random VAE weights drawn in numpy (kernels N(0, 1 / fan_in), norms identity, biases 0):
  tests and runlocal only. Not flax's init, whose truncated-normal initialisers take minutes to
  compile on a CPU for a network of this many layers."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  size = 4 * model.downsampling_factor
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def check_teacher_model(config, model) -> None:
  """Raises ConfigError (one line naming the key) when config.teacher.checkpoint_kind is
  unknown or config.model would read the published file with the wrong conventions (time
  mapping, prediction): checked before anything compiles."""
  from hierdistill.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  if config.model.name == "sana":
    if float(model.time_scale) != 1000.0:
      raise ConfigError(f"config.model.time_scale={model.time_scale}: SANA's published weights "
                        "read 1000 t; set --config.model.time_scale=1000")
    return
  kind = config.teacher.get("checkpoint_kind", "sit")
  if kind not in TEACHER_PUBLISHED:
    raise ConfigError(f"config.teacher.checkpoint_kind={kind!r}; choose from "
                      f"{tuple(TEACHER_PUBLISHED)} (convert/dit.py, convert/lightningdit.py)")
  is_lightning = type(model).__name__ == "LightningDiT"
  if (kind == "lightningdit") != is_lightning:
    raise ConfigError(f"config.teacher.checkpoint_kind={kind!r} but config.model.name="
                      f"{config.model.name!r}: a LightningDiT file needs model.name="
                      "'lightningdit', and a DiT/SiT/REPA file model.name='dit'")
  fields = (convert_lightningdit.MODEL_FIELDS if is_lightning
            else convert_dit.MODEL_FIELDS[kind])
  for field, value in fields.items():
    if getattr(model, field) != value:
      raise ConfigError(f"config.model.{field}={getattr(model, field)!r} but a {kind.upper()} "
                        f"checkpoint needs {value!r} (convert/dit.py explains the convention)")


def load_teacher(config, model) -> Dict[str, Any]:
  """The imported teacher's params (nested numpy dict) for `model` (the run's teacher DiT or
  SANA; for SANA a diffusers weights file stands for its folder). The importers read and write
  the published layout, one block a subtree; a model with scan_blocks gets them stacked."""
  scanned = getattr(model, "scan_blocks", False)
  if scanned:
    model = model.clone(scan_blocks=False)
  kind = config.teacher.get("checkpoint_kind", "sit")
  if config.model.name == "sana":
    params = load_sana_teacher(config, model)
  elif kind == "lightningdit":
    params = convert_lightningdit.load_lightningdit_checkpoint(
        config.teacher.init_checkpoint, model, config_key="config.teacher.init_checkpoint")
  else:
    params = convert_dit.load_dit_checkpoint(
        config.teacher.init_checkpoint, model, kind=kind,
        config_key="config.teacher.init_checkpoint")
  return block_stack.stack_blocks(params) if scanned else params


SANA_ARCHITECTURE = ("in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                     "cross_num_heads", "mlp_ratio", "caption_channels", "qk_norm")


def sana_teacher_path(path: str) -> str:
  """A diffusers weights file inside a folder with config.json means that folder (the pipeline
  names the teacher by a file: a .pth of NVlabs, or the safetensors of diffusers)."""
  folder = os.path.dirname(path)
  if path.endswith(".safetensors") and os.path.isfile(os.path.join(folder, "config.json")):
    return folder
  return path


def load_sana_teacher(config, model) -> Dict[str, Any]:
  """SANA's published transformer (convert/sana.py) as params of `model`; the file's sizes must
  be config.model's (one line naming the first that differs)."""
  from hierdistill.convert import sana as convert_sana  # pylint: disable=g-import-not-at-top
  key = "config.teacher.init_checkpoint"
  imported, params = convert_sana.load_sana(sana_teacher_path(config.teacher.init_checkpoint),
                                            config_key=key)
  for field in SANA_ARCHITECTURE:
    if getattr(imported, field) != getattr(model, field):
      raise ValueError(f"{key}={config.teacher.init_checkpoint!r} holds a SANA with {field}="
                       f"{getattr(imported, field)} but config.model.{field}="
                       f"{getattr(model, field)}; pick the experiment's variant of that size")
  return params
