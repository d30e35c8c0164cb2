"""Text-to-image with a SANA teacher, evaluated on MJHQ-30K (config.data.name 't2i_latents',
experiments/mjhq_sana.py, docs/t2i.md):

  opening        every file the run reads is checked first (`required_files`: one line naming
                 the key, the path and where it is published), before anything compiles; then
                 the frozen Gemma-2 encoder gives the null condition (the empty prompt) and the
                 training shards are opened (data/text_latents.py: DC-AE latents + captions +
                 their encodings, from an image-caption set or from the teacher's samples)
  make_pipeline  data/text_latents.TextLatentPipeline: per process, by (seed, step)
  save_grid      latents decoded by DC-AE, rows of GRID_COLUMNS samples under their prompt
  make_scorer    MJHQEval: FID per category and overall, CLIP score (evaluation/mjhq.py)
The published teacher (config.teacher.init_checkpoint: NVlabs' .pth, or the safetensors file of
a diffusers transformer/ folder) is imported by the chain (convert/from_config.load_teacher).

Mock mode (config.data.mock_num_examples > 0, runlocal): data/t2i_mock.py writes an
image-caption set, an MJHQ folder, tokenizers and a tiny random SANA teacher under
<workdir>/mock_t2i; the empty path keys are pointed at them (config.teacher.init_checkpoint
included, so the run's saved config says where its teacher came from).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import conditions as cond_lib
from hierdistill import sharding as shard_lib
from hierdistill.config_checks import ConfigError
from hierdistill.data import text_latents
from hierdistill.evaluation import driver
from hierdistill.evaluation import mjhq as mjhq_lib
from hierdistill.sources.base import DataSource

GRID_COLUMNS = 4  # samples per prompt in the training grids
MOCK_DIR = "mock_t2i"
LATENTS_MADE_BY = ("the shards launch/extract_t2i_latents.py writes from config.data."
                   "captions_file + images_dir (--config.data.real_source=images) or from "
                   "config.data.prompts_file (=teacher)")


# -- files -----------------------------------------------------------------------------------------

def tokenizer_path(block) -> str:
  """block.tokenizer, else the tokenizer.json beside the weights of block.path."""
  if block.get("tokenizer"):
    return block.tokenizer
  path = block.path or ""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  return os.path.join(folder, "tokenizer.json") if path else ""


def required_files(config) -> List[Tuple[str, str, str]]:
  """(config key, path, where published) of every file this config's stages read."""
  from hierdistill.convert import clip as convert_clip  # pylint: disable=g-import-not-at-top
  from hierdistill.convert import dcae as convert_dcae  # pylint: disable=g-import-not-at-top
  from hierdistill.convert import gemma2 as convert_gemma2  # pylint: disable=g-import-not-at-top
  from hierdistill.convert import inception as convert_inception  # pylint: disable=g-import-not-at-top
  from hierdistill.convert import sana as convert_sana  # pylint: disable=g-import-not-at-top
  from hierdistill.text import clip_prompts, sana_prompts  # pylint: disable=g-import-not-at-top
  stages = tuple(config.stages)
  out = []
  if "teacher" not in stages and {"trajectory", "distribution", "eval"} & set(stages):
    out.append(("config.teacher.init_checkpoint", config.teacher.init_checkpoint,
                f"{convert_sana.WHERE_PUBLISHED['original']}, or the diffusion_pytorch_model."
                f"safetensors of {convert_sana.WHERE_PUBLISHED['diffusers']}"))
  if not config.vae.random_init:
    out.append(("config.vae.path", config.vae.path, convert_dcae.WHERE_PUBLISHED))
  if not config.text_encoder.random_init:
    out.append(("config.text_encoder.path", config.text_encoder.path,
                convert_gemma2.WHERE_PUBLISHED))
  out.append(("config.text_encoder.tokenizer", tokenizer_path(config.text_encoder),
              sana_prompts.WHERE_PUBLISHED))
  if any(s in stages for s in ("teacher", "trajectory", "distribution")):
    out.append(("config.data.latents_dir",
                os.path.join(config.data.latents_dir, "info.json") if config.data.latents_dir
                else "", LATENTS_MADE_BY))
  if "eval" in stages:
    e = config.eval
    out.append(("config.eval.mjhq_meta", e.mjhq_meta, mjhq_lib.WHERE_PUBLISHED))
    if not (e.reference_stats and os.path.isfile(e.reference_stats)):
      out.append(("config.eval.mjhq_images", e.mjhq_images, mjhq_lib.WHERE_PUBLISHED))
    if not e.random_inception:
      out.append(("config.eval.inception_weights", e.inception_weights,
                  convert_inception.WHERE_PUBLISHED))
    if not config.clip.random_init:
      out.append(("config.clip.path", config.clip.path, convert_clip.WHERE_PUBLISHED))
    out.append(("config.clip.tokenizer", tokenizer_path(config.clip),
                clip_prompts.WHERE_PUBLISHED))
  return out


def check_files(config) -> None:
  """ConfigError, one line (key, path, where published), for the first missing file."""
  for key, path, where in required_files(config):
    if not path or not os.path.exists(path):
      raise ConfigError(f"{key}={path!r}: no such file; expected {where}")


def prepare_mock(config, workdir: str) -> None:
  """runlocal: writes the mock files once and points every empty path key at them."""
  from hierdistill.data import t2i_mock  # pylint: disable=g-import-not-at-top
  from hierdistill.models import registry  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, MOCK_DIR)
  d, e = config.data, config.eval
  files = t2i_mock.make(root, num_pairs=int(d.mock_num_examples), image_size=int(d.image_size),
                        mjhq_per_category=int(d.mock_mjhq_per_category),
                        mjhq_size=int(d.image_size))
  for block, key, value in ((d, "captions_file", files["captions_file"]),
                            (d, "images_dir", files["images_dir"]),
                            (d, "latents_dir", os.path.join(root, "latents")),
                            (e, "mjhq_meta", files["mjhq_meta"]),
                            (e, "mjhq_images", files["mjhq_images"]),
                            (config.text_encoder, "tokenizer", files["gemma_tokenizer"]),
                            (config.clip, "tokenizer", files["clip_tokenizer"])):
    if not block[key]:
      block[key] = value
  if not config.teacher.init_checkpoint and "teacher" not in config.stages:
    folder = os.path.join(root, "sana", "transformer")
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(weights):
      model = registry.build(config.model).clone(interval_conditioning=False)
      t2i_mock.write_sana_folder(folder, model, t2i_mock.random_sana_teacher(model, config.seed))
    config.teacher.init_checkpoint = weights


# -- networks --------------------------------------------------------------------------------------

def load_dcae(config, seed: int = 0):
  """(AutoencoderDC, params): the published DC-AE, or a random one with vae.random_init."""
  from hierdistill.models.dcae import AutoencoderDC  # pylint: disable=g-import-not-at-top
  scale = float(config.vae.scaling_factor)
  if config.vae.random_init:
    model = AutoencoderDC(**{**config.vae.sizes.to_dict(), "scaling_factor": scale})
    f = model.downsampling_factor
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, f, f, 3)))["params"]
    return model, params
  from hierdistill.convert import dcae as convert_dcae  # pylint: disable=g-import-not-at-top
  model, params = convert_dcae.load_dcae(config.vae.path, config_key="config.vae.path")
  if abs(model.scaling_factor - scale) > 1e-7:
    raise ConfigError(f"config.vae.scaling_factor={scale} but {config.vae.path} says "
                      f"{model.scaling_factor}; set the key to the teacher's")
  return model, params


def downsampling_factor(config) -> int:
  """DC-AE's f from the config alone (32 for the published f32c32; no weights read)."""
  if not config.vae.random_init:
    return 32
  from hierdistill.models.dcae import AutoencoderDC  # pylint: disable=g-import-not-at-top
  return AutoencoderDC(**config.vae.sizes.to_dict()).downsampling_factor


def load_text_encoder(config):
  """SanaTextEncoder: Gemma-2 (published, or tiny random with text_encoder.random_init)."""
  from hierdistill.text import sana_encoder, sana_prompts  # pylint: disable=g-import-not-at-top
  t = config.text_encoder
  tok = sana_prompts.load_tokenizer(tokenizer_path(t))
  kw = dict(use_instruction=bool(t.use_instruction),
            max_sequence_length=int(t.max_sequence_length), batch_size=int(t.get("batch_size", 0)))
  if t.random_init:
    return sana_encoder.random_encoder(tokenizer=tok, sizes=t.sizes.to_dict(),
                                       seed=config.seed, **kw)
  from hierdistill.convert import gemma2 as convert_gemma2  # pylint: disable=g-import-not-at-top
  from hierdistill.stages.common import dtype_of  # pylint: disable=g-import-not-at-top
  model, params = convert_gemma2.load_gemma2(t.path, config_key="config.text_encoder.path",
                                             overrides={"dtype": dtype_of(t.dtype)})
  return sana_encoder.SanaTextEncoder(model, params, tok, **kw)


def abstract_text_encoder(config) -> Tuple[Any, int, bool]:
  """(module, L, exact): the Gemma-2 that load_text_encoder would build and the length L of the
  sequences it encodes, from the config alone (no weights read), for launch/plan.py.

  L = sana_prompts.sequence_length(n_chi) with the instruction. n_chi is the tokenizer's count
  when its file is at hand (exact); else sana_prompts.instruction_length_bound, an upper
  bound."""
  from hierdistill.models import gemma2  # pylint: disable=g-import-not-at-top
  from hierdistill.text import sana_encoder, sana_prompts  # pylint: disable=g-import-not-at-top
  from hierdistill.stages.common import dtype_of  # pylint: disable=g-import-not-at-top
  t = config.text_encoder
  path = tokenizer_path(t)
  tok = sana_prompts.load_tokenizer(path) if path and os.path.exists(path) else None
  if t.random_init:
    module = sana_encoder.random_encoder_module(t.sizes.to_dict(), tok)
  else:  # the published 2B, stored in bfloat16 as convert/gemma2.load_gemma2 stores it
    module = gemma2.Gemma2Encoder(**{**gemma2.GEMMA2_2B, "dtype": dtype_of(t.dtype),
                                     "param_dtype": jnp.bfloat16})
  length, exact = int(t.max_sequence_length), True
  if t.use_instruction:
    exact = tok is not None
    n_chi = (sana_prompts.instruction_length(tok) if exact
             else sana_prompts.instruction_length_bound())
    length = sana_prompts.sequence_length(n_chi, length)
  return module, length, exact


def load_clip(config, seed: int = 0):
  """(CLIP, params, tokenize): ViT-L/14 (published, or CLIP_TINY random with clip.random_init)
  and its 77-token (max_text_length) tokenizer."""
  from hierdistill.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from hierdistill.text import clip_prompts  # pylint: disable=g-import-not-at-top
  if config.clip.random_init:
    model = clip_lib.CLIP(**clip_lib.CLIP_TINY)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, model.image_size,
                                                              model.image_size, 3)),
                        jnp.zeros((1, model.max_text_length), jnp.int32))["params"]
  else:
    from hierdistill.convert import clip as convert_clip  # pylint: disable=g-import-not-at-top
    model, params = convert_clip.load_clip(config.clip.path, config_key="config.clip.path")
  tok = clip_prompts.load_tokenizer(tokenizer_path(config.clip))
  return model, params, lambda texts: clip_prompts.tokenize(tok, texts, model.max_text_length)


def extract_from_config(config, out_dir: str, *, log=print) -> Dict[str, int]:
  """The training shards of config.data.real_source into out_dir: 'images' (captions_file +
  images_dir through DC-AE) or 'teacher' (prompts_file through the teacher's sampler: the
  teacher at data.teacher_steps with config.sample's solver, shift and CFG)."""
  d = config.data
  if d.real_source not in text_latents.SOURCES:
    raise ConfigError(f"config.data.real_source={d.real_source!r}; choose from "
                      f"{text_latents.SOURCES}")
  encoder = load_text_encoder(config)
  info = {"text_encoder": "random (tests)" if config.text_encoder.random_init
          else config.text_encoder.path, "use_instruction": bool(
              config.text_encoder.use_instruction),
          "max_sequence_length": int(config.text_encoder.max_sequence_length)}
  common = dict(out_dir=out_dir, num_shards=int(d.num_shards), batch_size=int(
      d.extract_batch_size), process_index=jax.process_index(),
      process_count=jax.process_count(), log=log)
  if d.real_source == "images":
    dcae, params = load_dcae(config, config.seed)
    size, f = int(d.image_size), dcae.downsampling_factor
    encode = jax.jit(lambda p, x: dcae.apply({"params": p}, x.astype(jnp.float32) / 127.5 - 1.0,
                                              method="encode"))
    rows = text_latents.read_captions(d.captions_file, "config.data.captions_file", True)
    return text_latents.extract_images(
        rows=rows, images_dir=d.images_dir, image_size=size,
        encode_images=lambda x: np.asarray(encode(params, jnp.asarray(x))),
        encode_text=encoder, latent_shape=(size // f, size // f, dcae.latent_channels),
        info={**info, "vae": "random (tests)" if config.vae.random_init else config.vae.path},
        **common)
  if d.real_source == "teacher":
    from hierdistill import models as models_lib  # pylint: disable=g-import-not-at-top
    from hierdistill.convert import from_config  # pylint: disable=g-import-not-at-top
    from hierdistill.stages import common as stage_common  # pylint: disable=g-import-not-at-top
    model = models_lib.build(config.model).clone(interval_conditioning=False)
    params = from_config.load_teacher(config, model)
    conditions = cond_lib.Text(*encoder.null())
    h = int(d.image_size) // downsampling_factor(config)
    shape = (h, h, int(config.model.in_channels))
    sample = jax.jit(lambda p, e, c: stage_common.sample_teacher(
        config, model, conditions, p, e, c, num_steps=int(d.teacher_steps)))
    rows = text_latents.read_captions(d.prompts_file, "config.data.prompts_file", False)
    s = config.sample
    return text_latents.make_teacher_reals(
        rows=rows, sample=lambda e, c: sample(params, jnp.asarray(e), c), encode_text=encoder,
        scaling_factor=float(config.vae.scaling_factor), latent_shape=shape,
        seed=int(d.seed), info={**info, "teacher": config.teacher.init_checkpoint,
                                "sampler": f"{s.teacher_method}, {d.teacher_steps} steps, CFG "
                                           f"{s.cfg_scale}, shift {s.get('shift', 1.0)}"},
        **common)
  raise AssertionError(d.real_source)  # unreachable: checked above


# -- the source ------------------------------------------------------------------------------------

class T2ISource(DataSource):
  """Text-to-image latents with a SANA teacher, MJHQ-30K eval (see the module docstring)."""

  def __init__(self, config, workdir: str, mesh):
    super().__init__(config, workdir, mesh)
    latents_dir = config.data.latents_dir
    if config.data.get("mock_num_examples", 0):
      prepare_mock(config, workdir)
      latents_dir = config.data.latents_dir
      if not os.path.isfile(os.path.join(latents_dir, "info.json")):
        print(f"[data] mock image-caption set -> latents in {latents_dir}", flush=True)
        extract_from_config(config, latents_dir)
    check_files(config)  # before the encoder compiles
    try:
      self.dataset = text_latents.open_text_latents(latents_dir)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(str(e)) from None
    self.name, self.shape = text_latents.NAME, tuple(self.dataset.shape)
    self.num_classes, self.examples = 0, self.dataset.num_examples
    # The captions were encoded at extraction: the run's encoder settings must be those.
    t, info = config.text_encoder, self.dataset.info
    for key, want in (("max_sequence_length", int(t.max_sequence_length)),
                      ("use_instruction", bool(t.use_instruction))):
      if key in info and info[key] != want:
        raise ConfigError(f"config.text_encoder.{key}={want} but the captions in {latents_dir} "
                          f"were encoded with {info[key]}; set it to the extraction's")
    self.text_encoder = load_text_encoder(config)
    self.conditions = cond_lib.Text(*self.text_encoder.null())

  # -- from the config alone (a trained generator is loaded without its data) -----------------

  @classmethod
  def example_shape(cls, config) -> tuple:
    h = int(config.data.image_size) // downsampling_factor(config)
    return (h, h, int(config.model.in_channels))

  @classmethod
  def condition_kind(cls, config):
    return cond_lib.Text(*load_text_encoder(config).null())

  @classmethod
  def abstract_text_encoder(cls, config):
    """The frozen encoder this source runs on a chip (at extraction and for the eval's
    prompts), for planning: abstract_text_encoder above."""
    return abstract_text_encoder(config)

  @classmethod
  def example_prompts(cls, config) -> tuple:
    return tuple(config.sample.grid_prompts)

  @classmethod
  def conditions_from_prompts(cls, config, prompts) -> Dict[str, np.ndarray]:
    return load_text_encoder(config)(list(prompts))

  def check_model(self) -> None:
    super().check_model()
    m = self.config.model
    if m.in_channels != self.shape[-1]:
      raise ConfigError(f"config.model.in_channels={m.in_channels} but the latents of "
                        f"{self.config.data.latents_dir} have {self.shape[-1]} channels; set "
                        f"--config.model.in_channels={self.shape[-1]}")

  def make_pipeline(self, global_batch_size: int, seed: int):
    return text_latents.TextLatentPipeline(
        self.dataset, global_batch_size, seed, scaling_factor=float(self.config.vae.scaling_factor),
        process_index=jax.process_index(), process_count=jax.process_count())

  # -- prompts ---------------------------------------------------------------------------------

  def grid_prompts(self, n: int) -> List[str]:
    """Row r of the grid (GRID_COLUMNS samples) asks for sample.grid_prompts[r % len]."""
    prompts = list(self.config.sample.grid_prompts)
    return [prompts[(i // GRID_COLUMNS) % len(prompts)] for i in range(n)]

  def grid_conditions(self, n: int) -> Dict[str, np.ndarray]:
    return self.text_encoder(self.grid_prompts(n))

  def eval_prompts(self, num_samples: int) -> List[mjhq_lib.Prompt]:
    return mjhq_lib.select_prompts(mjhq_lib.read_meta(self.config.eval.mjhq_meta), num_samples)

  def eval_conditions(self, num_samples: int) -> Dict[str, np.ndarray]:
    return self.text_encoder([p.prompt for p in self.eval_prompts(num_samples)])

  # -- images ----------------------------------------------------------------------------------

  @functools.cached_property
  def vae(self):
    """(AutoencoderDC, params replicated over the mesh), loaded on first use."""
    model, params = load_dcae(self.config, self.config.seed)
    return model, jax.device_put(params, shard_lib.replicated(self.mesh))

  def decode_fn(self):
    """Scaled latents -> images in [-1, 1], jit-able, DC-AE's params closed over."""
    model, params = self.vae
    return lambda z: model.apply({"params": params}, z / model.scaling_factor, method="decode")

  def save_grid(self, samples, path: str, conditions=None) -> None:
    del conditions  # the grid's prompts, by row
    decode = jax.jit(self.decode_fn())
    bs = int(self.config.vae.batch_size)
    samples = np.asarray(samples)
    images = np.concatenate([np.asarray(decode(jnp.asarray(samples[i:i + bs])))
                             for i in range(0, len(samples), bs)])
    mjhq_lib.save_rows(np.clip(images, -1.0, 1.0), self.grid_prompts(len(images))[::GRID_COLUMNS],
                       path, columns=GRID_COLUMNS)

  def make_scorer(self, chain):
    return MJHQEval(chain)


class MJHQEval:
  """The eval driver's scorer: MJHQ-30K FID (overall, per category) and CLIP score of samples
  decoded by DC-AE, with the prompts encoded by Gemma-2 batch by batch."""

  def __init__(self, chain):
    from hierdistill.convert import from_config  # pylint: disable=g-import-not-at-top
    self.chain, config, source = chain, chain.config, chain.source
    self.cfg = e = config.eval
    self.prompts = source.eval_prompts(int(e.num_samples))
    self.random = bool(e.random_inception) or bool(config.clip.random_init)
    inception, inception_params = from_config.load_inception(config)
    clip, clip_params, clip_tokenize = load_clip(config, config.seed)
    encoder = source.text_encoder
    rep = shard_lib.replicated(chain.mesh)
    encoder.params = jax.device_put(encoder.params, rep)  # moved once, not every batch
    self.scorer = mjhq_lib.MJHQScorer(
        decode=source.decode_fn(), encode_prompts=encoder, inception=inception,
        inception_params=inception_params, clip=clip, clip_params=clip_params,
        clip_tokenize=clip_tokenize, mesh=chain.mesh, size=int(e.size),
        batch_size=int(e.batch_size), random_features=self.random,
        inception_size=int(e.inception_size))
    self.reference_path = e.reference_stats or os.path.join(
        chain.workdir, "eval", f"mjhq_reference_{int(e.size)}px.npz")
    made_by = {"meta": e.mjhq_meta, "images": e.mjhq_images,
               "feature_net": "random Inception (tests)" if e.random_inception else
                              f"FID Inception-v3 {e.inception_weights}"}
    self.reference, self.counts = self.scorer.reference_statistics(
        mjhq_lib.read_meta(e.mjhq_meta), e.mjhq_images, self.reference_path, made_by)
    self.key = driver.eval_key(config)

  def measure(self, sample_fn, params, files_prefix=None):
    del files_prefix
    return self.scorer.measure(sample_fn, params, prompts=self.prompts,
                               latent_shape=self.chain.source.shape, key=self.key,
                               reference=self.reference,
                               keep_images=int(self.chain.config.sample.grid_size))

  def save_grid(self, images: np.ndarray, path: str) -> None:
    mjhq_lib.save_prompt_grid(images, self.prompts, path)

  def describe(self) -> dict:
    s = self.chain.config.sample
    return mjhq_lib.describe(
        num_samples=int(self.cfg.num_samples), size=int(self.cfg.size), meta=self.cfg.mjhq_meta,
        reference=self.reference_path, counts=self.counts, random_features=self.random,
        sampler=f"{s.teacher_method}, shift {s.get('shift', 1.0)}, CFG {s.cfg_scale} against "
                "the empty prompt")
