"""The one-step SANA student as a folder that diffusers.SanaPipeline.from_pretrained loads
(launch/export.py --format=diffusers; export_formats.py explains the fold that makes the student
a SanaTransformer2DModel, exact at (r, t) = (0, 1)).

  model_index.json   SanaPipeline and its five components
  transformer/       the folded student (convert/sana.write_diffusers; timestep_scale carries
                     our time_scale / 1000)
  scheduler/         FlowMatchEulerDiscreteScheduler, shift 1: with one step it sets sigma = 1
                     (timestep 1000 sigma = 1000, our t = 1) and steps to sigma = 0, so
                     x = z + (0 - 1) v = z - u(z, 0, 1 | c): our one-step sample
  vae/               DC-AE: the run's published folder copied, or the random runlocal one
                     written from its params; config.json carries scaling_factor, by which the
                     pipeline divides before decoding, as we do
  text_encoder/      Gemma-2 (Gemma2Model): the run's folder copied, or the random runlocal one
                     written from its params
  tokenizer/         the run's tokenizer files; a bare tokenizer.json (runlocal's word-level
                     mock) gets tokenizer_config.json and Gemma's BOS post-processor, which
                     text/sana_prompts.py adds by hand
  README.md, export.json   the card with the diffusers call, where it came from

The pipeline encodes prompts as the run did only when its call matches the run's text settings:
max_sequence_length (300 for SANA) and the complex human instruction (on in SANA and in the
pipeline by default); the card writes both, with guidance off (guidance_scale=1: the teacher's
guidance was distilled into the student) and resolution binning off (the student draws the
latent size it was trained at, which binning would change).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Tuple

import numpy as np

from hierdistill import export
from hierdistill.config_checks import ConfigError

SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
             "shift": 1.0, "use_dynamic_shifting": False}
INFO_FILE = "export.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model")
# Gemma's special tokens (text/sana_prompts.py reads the same names).
_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
             "unk_token": "<unk>"}


def write(gen, out_dir: str, model, params, *, run_config, name: str) -> dict:
  """The pipeline folder of gen's SANA student (see the module docstring); model, params: the
  student folded into a teacher-class SanaTransformer (export_formats.fold_interval). Returns
  export.json's contents."""
  from hierdistill.convert import sana as convert_sana  # pylint: disable=g-import-not-at-top
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("--format=diffusers checks the folder against diffusers' classes: "
                      "install diffusers and torch (pip install diffusers torch).") from None
  if gen.decoder is None or type(gen.decoder[0]).__name__ != "AutoencoderDC":
    raise ConfigError("--format=diffusers writes a SanaPipeline, whose VAE is DC-AE; this run "
                      "has none (config.vae of a SANA run).")
  for block in ("text_encoder", "vae"):
    if block not in run_config:
      raise ConfigError(f"--format=diffusers needs the run's config.{block} (a SANA run's); "
                        "this run's config has none.")
  tokenizer_file(run_config)  # a missing file stops the export before anything is written
  convert_sana.write_diffusers(os.path.join(out_dir, "transformer"), model, params,
                               sample_size=int(gen.shape[0]))
  tokenizer_class = write_text(out_dir, run_config)
  write_vae(os.path.join(out_dir, "vae"), run_config, *gen.decoder)
  os.makedirs(os.path.join(out_dir, "scheduler"))
  with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(dict(SCHEDULER, _diffusers_version=diffusers.__version__), f, indent=2)
  index = {"_class_name": "SanaPipeline", "_diffusers_version": diffusers.__version__,
           "scheduler": ["diffusers", SCHEDULER["_class_name"]],
           "text_encoder": ["transformers", "Gemma2Model"],
           "tokenizer": ["transformers", tokenizer_class],
           "transformer": ["diffusers", "SanaTransformer2DModel"],
           "vae": ["diffusers", "AutoencoderDC"]}
  with open(os.path.join(out_dir, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
  t = run_config.text_encoder
  f = gen.decoder[0].downsampling_factor
  call = {"num_inference_steps": 1, "guidance_scale": 1.0,
          "max_sequence_length": int(t.get("max_sequence_length", 300)),
          "height": int(gen.shape[0]) * f, "width": int(gen.shape[1]) * f,
          "use_resolution_binning": False}
  if not t.get("use_instruction", True):
    call["complex_human_instruction"] = None
  meta = {"format": "diffusers", "role": "student", "exact_at": "one step, (r, t) = (0, 1)",
          "pipeline": "SanaPipeline", "call": call,
          "source": export.source_record(gen.info, run_config)}
  with open(os.path.join(out_dir, INFO_FILE), "w") as fh:
    json.dump(meta, fh, indent=2)
  with open(os.path.join(out_dir, "README.md"), "w") as fh:
    fh.write(card(meta, name))
  return meta


def card(meta: dict, name: str) -> str:
  call = ", ".join(f"{k}={v!r}" for k, v in meta["call"].items())
  src = meta["source"]
  return f"""# {src.get('experiment') or 'hierdistill'} one-step SANA student (diffusers)

A one-step text-to-image generator distilled from SANA by Hierarchical Distillation
(hierdistill), as a diffusers SanaPipeline folder. The student's interval embedding at
(r, t) = (0, 1) is folded into the time embedder's last bias: the transformer is a plain
SanaTransformer2DModel, exact for one step and only for one step.

```python
from diffusers import SanaPipeline
pipe = SanaPipeline.from_pretrained("{name}")  # float32
images = pipe(["a red circle on a white background"], {call}).images
```

One step of FlowMatchEulerDiscreteScheduler (shift 1) is x = z - u(z, 0, 1 | c); guidance is
off because the teacher's guidance was distilled into the student; resolution binning is off
so that the pipeline draws the latent size the student was trained at. Pass `latents=` (N, C,
h, w) noise to reproduce hierdistill's samples of the same noise.

Source: experiment {src.get('experiment') or '?'} (config SHA-256 {src.get('config_sha256')}),
{src.get('stage')} stage, step {src.get('step')}. Details in `{INFO_FILE}`.
"""


# -- components ------------------------------------------------------------------------------------

def write_text(out_dir: str, run_config) -> str:
  """text_encoder/ and tokenizer/ from the run's files (or its random runlocal encoder);
  returns the tokenizer's transformers class name."""
  from hierdistill.sources import mjhq  # pylint: disable=g-import-not-at-top
  t = run_config.text_encoder
  tok_file = tokenizer_file(run_config)
  enc_dir, tok_dir = os.path.join(out_dir, "text_encoder"), os.path.join(out_dir, "tokenizer")
  os.makedirs(tok_dir)
  if t.get("random_init", False):
    encoder = mjhq.load_text_encoder(run_config)
    write_gemma2(enc_dir, encoder.model, encoder.params)
  else:
    _copy_model_folder(t.get("path", ""), enc_dir, "config.text_encoder.path",
                       ("config.json", "model.safetensors", "model.safetensors.index.json"),
                       prefix="model")
  folder = os.path.dirname(tok_file)
  present = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
  if "tokenizer_config.json" in present:  # a published tokenizer folder: copied as it is
    for n in present:
      shutil.copyfile(os.path.join(folder, n), os.path.join(tok_dir, n))
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
      return json.load(f).get("tokenizer_class") or "GemmaTokenizerFast"
  _bare_tokenizer(tok_file, tok_dir)
  return "PreTrainedTokenizerFast"


def tokenizer_file(run_config) -> str:
  """The run's tokenizer.json; ConfigError, one line, when it is missing."""
  from hierdistill.sources import mjhq  # pylint: disable=g-import-not-at-top
  tok_file = mjhq.tokenizer_path(run_config.text_encoder)
  if not tok_file or not os.path.isfile(tok_file):
    raise ConfigError(f"config.text_encoder.tokenizer={tok_file!r}: no such file; the diffusers "
                      "export copies the run's Gemma tokenizer (tokenizer.json beside "
                      "config.text_encoder.path): give its path.")
  return tok_file


def _bare_tokenizer(tok_file: str, tok_dir: str) -> None:
  """A lone tokenizer.json as a transformers folder: Gemma's specials, right padding, and the
  BOS a Gemma tokenizer adds (text/sana_prompts.py adds it by hand; the pipeline relies on the
  tokenizer)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_file(tok_file)
  missing = [s for s in _SPECIALS.values() if tok.token_to_id(s) is None]
  if missing:
    raise ConfigError(f"{tok_file} has no {missing[0]!r} token; the diffusers export needs "
                      "Gemma's <bos>, <eos>, <pad> and <unk>.")
  if tok.post_processor is None:
    bos = _SPECIALS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
  tok.save(os.path.join(tok_dir, "tokenizer.json"))
  with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
    json.dump(dict(_SPECIALS, tokenizer_class="PreTrainedTokenizerFast", padding_side="right",
                   model_max_length=1 << 20), f, indent=2)


def write_gemma2(folder: str, model, params) -> None:
  """A Gemma2Encoder's params as a transformers Gemma2Model folder (bare keys, float32)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from hierdistill.convert import gemma2 as convert_gemma2  # pylint: disable=g-import-not-at-top
  os.makedirs(folder)
  tensors = {}
  for path, value in traverse_util.flatten_dict(_plain(params)).items():
    key = convert_gemma2.hf_key(path)[len("model."):]  # a bare Gemma2Model has no prefix
    value = np.asarray(value, np.float32)
    tensors[key] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
  save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  config = {"architectures": ["Gemma2Model"], "model_type": "gemma2",
            "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
            "intermediate_size": model.intermediate_size,
            "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
            "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim,
            "query_pre_attn_scalar": model.query_pre_attn_scalar,
            "attn_logit_softcapping": model.attn_logit_softcap,
            "final_logit_softcapping": None, "sliding_window": model.sliding_window,
            "layer_types": list(model.resolved_layer_types()),
            "rms_norm_eps": model.rms_norm_eps, "rope_theta": model.rope_theta,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "torch_dtype": "float32"}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def write_vae(folder: str, run_config, vae_model, vae_params) -> None:
  """vae/: the run's published DC-AE folder copied, or the random one written from params."""
  import jax  # pylint: disable=g-import-not-at-top
  if not run_config.vae.get("random_init", False):
    _copy_model_folder(run_config.vae.get("path", ""), folder, "config.vae.path",
                       ("config.json", "diffusion_pytorch_model.safetensors",
                        "diffusion_pytorch_model.safetensors.index.json"),
                       prefix="diffusion_pytorch_model")
    return
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config, tensors = dcae_to_diffusers(vae_model, jax.device_get(vae_params))
  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"),
            metadata={"format": "pt"})


def dcae_to_diffusers(model, params) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(config.json, {diffusers key: float32 array}) of an AutoencoderDC: convert/dcae.py run
  backwards. Which of our 2-D kernels are 1x1 convs in diffusers is read from diffusers'
  own module built on the meta device (no memory)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderDC  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from hierdistill.convert import dcae as convert_dcae  # pylint: disable=g-import-not-at-top
  config = {"_class_name": "AutoencoderDC"}
  for key in convert_dcae._FIELDS:  # pylint: disable=protected-access
    config[key] = export._jsonable(getattr(model, key))  # pylint: disable=protected-access
  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in AutoencoderDC.from_config(config).state_dict().items()}
  flat = traverse_util.flatten_dict(_plain(params))
  tensors = {}
  for key, shape in shapes.items():
    value = np.asarray(flat[convert_dcae.flax_path(key)], np.float32)
    if value.ndim == 4:  # (kh, kw, I/g, O) -> (O, I/g, kh, kw)
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:  # a Dense here: Linear (O, I) or 1x1 conv (O, I, 1, 1) there
      value = value.T.reshape(shape)
    if tuple(value.shape) != shape:
      raise ValueError(f"DC-AE param {key}: ours has shape {value.shape}, diffusers' {shape}")
    tensors[key] = np.ascontiguousarray(value)
  return config, tensors


def _copy_model_folder(path: str, dest: str, key: str, names: Tuple[str, ...], *,
                       prefix: str) -> None:
  """A published folder's config and weights (shards included) copied into dest."""
  if not path or not os.path.isdir(path) or not os.path.isfile(os.path.join(path, names[0])):
    raise ConfigError(f"{key}={path!r} is not a folder with {names[0]}: the diffusers export "
                      "copies the run's published files from there; give the folder.")
  os.makedirs(dest)
  files = [n for n in os.listdir(path) if n == names[0] or (
      n.startswith(prefix) and n.endswith((".safetensors", ".json")))]
  if not any(n.endswith(".safetensors") for n in files):
    raise ConfigError(f"{key}={path!r} has no {prefix}*.safetensors to copy; give the folder "
                      "with the weights.")
  for n in files:
    shutil.copyfile(os.path.join(path, n), os.path.join(dest, n))


def _plain(tree: Any) -> Any:
  from hierdistill.convert import dit_layout  # pylint: disable=g-import-not-at-top
  return dit_layout._plain(tree)  # pylint: disable=protected-access
