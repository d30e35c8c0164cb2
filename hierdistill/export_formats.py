"""A one-step student in the formats people already run (launch/export.py --format=...):
the official SiT, DiT and LightningDiT model code for class labels (this module), diffusers'
SanaPipeline for text (export_diffusers.py).

Why a student becomes a network of its teacher's own class. A one-step student is evaluated
at one point, (r, t) = (0, 1): its interval embedding h = h_emb(interval_scale * (t - r)) is
then one constant vector. In every network here it is added to the time embedding and the sum
is used exactly where the teacher uses the time embedder's output, and nowhere else:
  DiT, SiT, REPA, LightningDiT (models/dit.DiT.conditioning, which LightningDiT inherits):
    c = t_emb + y_emb [+ h], read only through SiLU by every adaLN_modulation and the final
    layer's: the official forward computes c = t_embedder(t) + y_embedder(y) the same way;
  SANA (models/sana.SanaTransformer.conditioning): emb = t_emb [+ h], read by t_block through
    SiLU (diffusers' time_embed.linear) and added raw to the final scale_shift_table (diffusers'
    embedded_timestep), both of which diffusers feeds from timestep_embedder.linear_2's output.
t_emb ends with a Dense, W2 a + b2, so W2 a + (b2 + h) is the student's sum at that point:
fold_interval writes h into b2 and drops the interval embedder. The result is exact at (0, 1)
(up to float32 re-association) and only there: a student asked for two steps (other (r, t)) is
refused, since those need the interval embedder.

The checkpoint formats (a torch .pt state dict, read by the official code's own
torch.load + load_state_dict):
  sit, dit      the DiT/SiT module tree (convert/dit_layout.to_published): the same keys for
                SiT's models.py and DiT's models.py; REPA's SiT reads them with strict=False
                (it adds alignment projectors, which sampling never calls).
  lightningdit  hustvl/LightningDiT's models/lightningdit.py keys
                (convert/lightningdit.to_published).
The card gives the one call that draws a sample: x = z + sign * model(z, t_in, y)[:, :C] with
the t_in and sign of the network's own time convention (SiT's: t_in = 0, the noise end, and
+, since SiT's velocity is x - e; ours: t_in = time_scale, and -).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from hierdistill import export
from hierdistill.config_checks import ConfigError
from hierdistill.convert import dit_layout

FORMATS = ("hierdistill", "diffusers", "sit", "dit", "lightningdit")
LABEL_FORMATS = ("sit", "dit", "lightningdit")
CHECKPOINT_FILE = "model.pt"
INFO_FILE = "export.json"


def fold_interval(model, params) -> Tuple[Any, Dict[str, Any]]:
  """(teacher-class model, params) whose v(z, t=1 | c) is the student's u(z, 0, 1 | c): the
  interval embedding at (r, t) = (0, 1) added to the time embedder's last bias (see the module
  docstring). model: a student (interval_conditioning=True) of DiT, LightningDiT or SANA."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hierdistill.models.embeddings import TimestepEmbedder  # pylint: disable=g-import-not-at-top
  if not getattr(model, "interval_conditioning", False):
    raise ValueError(f"{type(model).__name__} has no interval embedder: nothing to fold.")
  params = dit_layout._plain(params)  # pylint: disable=protected-access
  embedder = TimestepEmbedder(model.hidden_size, model.frequency_size, dtype=model.dtype,
                              param_dtype=model.param_dtype)
  # The student's own input at (0, 1): interval_scale * (t - r), in float32 as interval_of.
  h = embedder.apply({"params": params["interval_embedder"]},
                     jnp.full((1,), model.interval_scale * 1.0, jnp.float32))[0]
  folded = {k: v for k, v in params.items() if k != "interval_embedder"}
  t_emb = dict(folded["t_embedder"])
  last = dict(t_emb["mlp_2"])
  last["bias"] = (np.asarray(last["bias"], np.float32) + np.asarray(h, np.float32)).astype(
      np.asarray(last["bias"]).dtype)
  t_emb["mlp_2"] = last
  folded["t_embedder"] = t_emb
  return model.clone(interval_conditioning=False), folded


def check_request(gen, fmt: str, num_steps: int) -> None:
  """ConfigError, one line, when gen cannot be written in format fmt."""
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt}: choose one of {', '.join(FORMATS)}.")
  if fmt == "hierdistill":
    if type(gen.model).__name__ == "SanaTransformer":
      # Its prompts need the run's Gemma-2 and its DC-AE, which this format does not carry.
      raise ConfigError("--format=hierdistill does not hold a SANA run (its text encoder and "
                        "DC-AE stay outside it); use --format=diffusers for the one-step "
                        "student, or sample the workdir itself (launch/sample.py --from=RUN).")
    return
  if gen.role != "student":
    raise ConfigError(f"--format={fmt} exports a one-step student; this is the {gen.role} (the "
                      "published code reads its own teacher already): export a distilled "
                      "stage, or use --format=hierdistill.")
  if num_steps != 1:
    raise ConfigError(f"--format={fmt} with --num_steps={num_steps}: the student's interval "
                      "embedding is folded into the time embedder, exact at one step (r, t) = "
                      "(0, 1) only; use --num_steps=1, or --format=hierdistill for "
                      f"{num_steps}-step sampling.")
  name = type(gen.model).__name__
  wanted = {"diffusers": ("SanaTransformer",), "sit": ("DiT",), "dit": ("DiT",),
            "lightningdit": ("LightningDiT",)}[fmt]
  if name not in wanted or (fmt in ("sit", "dit") and not _is_label_velocity_dit(gen.model)):
    hint = {"SanaTransformer": "diffusers", "LightningDiT": "lightningdit"}.get(
        name, "sit or dit" if _is_label_velocity_dit(gen.model) else "hierdistill")
    raise ConfigError(f"--format={fmt} holds a {' or '.join(wanted)} network; this run's is a "
                      f"{name}{' (text)' if gen.is_text else ''}: use --format={hint}.")


def _is_label_velocity_dit(model) -> bool:
  return type(model).__name__ == "DiT" and dit_layout.has_published_layout(model)


def one_step_call(model) -> Tuple[float, str]:
  """(t_in, sign): the official forward's time input at our (r, t) = (0, 1), and the sign with
  which its output moves the noise to the sample (x = z + sign * out)."""
  from hierdistill.convert import lightningdit as convert_lightningdit  # pylint: disable=g-import-not-at-top
  t_in = float(model.time_scale) * (0.0 if model.time_flip else 1.0)
  sit_convention = all(getattr(model, f) == v
                       for f, v in convert_lightningdit.MODEL_FIELDS.items())
  # The files store SiT's own x - e under SiT's convention (the exporters negate ours back).
  return t_in, "+" if sit_convention else "-"


def state_dict(fmt: str, model, params) -> Dict[str, np.ndarray]:
  """{official key: float32 array} of a teacher-class model (after fold_interval)."""
  if fmt == "lightningdit":
    from hierdistill.convert import lightningdit as convert_lightningdit  # pylint: disable=g-import-not-at-top
    return convert_lightningdit.to_published(params, model)
  return dit_layout.to_published(params, model)


def write(gen, out_dir: str, fmt: str, *, run_config, name: str, num_steps: int = 1) -> dict:
  """gen's student in format fmt (not 'hierdistill': export.py) into out_dir; returns the
  export's description. name: the directory's final name, for the card's snippet."""
  import jax  # pylint: disable=g-import-not-at-top
  check_request(gen, fmt, num_steps)
  if fmt == "diffusers":
    from hierdistill import export_diffusers  # pylint: disable=g-import-not-at-top
    model, params = fold_interval(gen.model, jax.device_get(gen.params))
    return export_diffusers.write(gen, out_dir, model, params, run_config=run_config,
                                  name=name)
  return write_checkpoint(gen, out_dir, fmt, run_config=run_config, name=name)


def write_checkpoint(gen, out_dir: str, fmt: str, *, run_config, name: str) -> dict:
  """model.pt (the official state dict of the folded student), export.json and README.md in
  out_dir; returns export.json's contents."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f"--format={fmt} writes a PyTorch checkpoint: install torch "
                      "(pip install torch), or use --format=hierdistill.") from None
  model, params = fold_interval(gen.model, jax.device_get(gen.params))
  tensors = state_dict(fmt, model, params)
  # torch.from_numpy wants a writable array: a copy of each.
  torch.save({k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()},
             os.path.join(out_dir, CHECKPOINT_FILE))
  t_in, sign = one_step_call(model)
  meta = {"format": fmt, "role": "student", "exact_at": "one step, (r, t) = (0, 1)",
          "file": CHECKPOINT_FILE, "constructor": constructor_args(fmt, model),
          "one_step": {"t": t_in, "sign": sign,
                       "sample": f"x = z {sign} model(z, t, y)[:, :{model.in_channels}]"},
          "vae": _vae_note(gen),
          "source": export.source_record(gen.info, run_config),
          "sha256": {CHECKPOINT_FILE: export._sha256(  # pylint: disable=protected-access
              os.path.join(out_dir, CHECKPOINT_FILE))}}
  with open(os.path.join(out_dir, INFO_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(checkpoint_card(meta, name))
  return meta


def constructor_args(fmt: str, model) -> Dict[str, Any]:
  """The keyword arguments of the official model class that match the file."""
  args = dict(input_size=int(model.input_size), patch_size=int(model.patch_size),
              in_channels=int(model.in_channels), hidden_size=int(model.hidden_size),
              depth=int(model.depth), num_heads=int(model.num_heads),
              mlp_ratio=float(model.mlp_ratio), num_classes=int(model.num_classes))
  if fmt == "lightningdit":
    args.update(learn_sigma=False, use_qknorm=bool(model.qk_norm), use_swiglu=True,
                use_rope=bool(model.use_rope), use_rmsnorm=True, wo_shift=False)
  else:
    args["learn_sigma"] = int(model.resolved_out_channels) == 2 * int(model.in_channels)
  return args


_CODE = {  # format -> (repository, import line, class)
    "sit": ("willisma/SiT (models.py)", "from models import SiT", "SiT"),
    "dit": ("facebookresearch/DiT (models.py)", "from models import DiT", "DiT"),
    "lightningdit": ("hustvl/LightningDiT (models/lightningdit.py)",
                     "from models.lightningdit import LightningDiT", "LightningDiT"),
}


def checkpoint_card(meta: dict, name: str) -> str:
  fmt, args, step = meta["format"], meta["constructor"], meta["one_step"]
  repo, import_line, cls = _CODE[fmt]
  kwargs = ", ".join(f"{k}={v!r}" for k, v in args.items())
  src = meta["source"]
  t = step["t"]
  what = ("SiT's noise end (its t runs from 0, noise, to 1, data)" if step["sign"] == "+" else
          "our noise end t = 1, embedded as time_scale * t")
  return f"""# {src.get('experiment') or 'hierdistill'} one-step student ({fmt} checkpoint)

A one-step generator distilled by Hierarchical Distillation (hierdistill), stored as a
checkpoint of {repo}: `{CHECKPOINT_FILE}` is a plain state dict of the class's own keys. The
student's interval embedding at (r, t) = (0, 1) is folded into the time embedder's last bias,
so the file is exact for one step and only for one step.

```python
import torch
{import_line}
model = {cls}({kwargs})
model.load_state_dict(torch.load("{name}/{CHECKPOINT_FILE}", map_location="cpu"))
model.eval()
z = torch.randn(n, {args['in_channels']}, {args['input_size']}, {args['input_size']})  # noise
y = torch.tensor(labels)  # class labels 0..{args['num_classes'] - 1}
x = z {step['sign']} model(z, torch.full((n,), {t!r}), y)[:, :{args['in_channels']}]  # one step
```

t = {t!r} is {what}; the sign is {step['sign']} because the file's output is
{'x - e (SiT convention)' if step['sign'] == '+' else 'e - x (our convention)'}. No guidance:
it was distilled in. Decode x with the run's VAE: {meta['vae']}.
{'REPA (sihyun-yu/REPA, models/sit.py) reads the same keys with strict=False (its alignment projectors are absent) and returns (x, zs).' if fmt == 'sit' else ''}

Source: experiment {src.get('experiment') or '?'} (config SHA-256 {src.get('config_sha256')}),
{src.get('stage')} stage, step {src.get('step')}. Details in `{INFO_FILE}`.
"""


def _vae_note(gen) -> str:
  if gen.decoder is None:
    return "none (the samples are the model's space)"
  vae_model = gen.decoder[0]
  scale = float(vae_model.scaling_factor)
  if getattr(vae_model, "latent_std", None) is not None:
    return (f"per-channel latent statistics (VA-VAE), z = (x / {scale:g}) * std + mean, "
            "then decode")
  return f"z = x / {scale:g}, then decode (SD-VAE)"

