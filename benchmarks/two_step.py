"""Why two steps degrade after stage 2, and which two-step path does not: samplers compared.

Stage 2 trains the flow map at one interval only, u(e, 0, 1). The uniform two-step path also
reads u(e, 0.5, 1) and u(z_0.5, 0, 0.5), which share the network's weights but no loss after
stage 1: they drift as stage 2 moves the weights for (0, 1). The paths compared here, each from
the same noise, for stage 1 alone (TD only) and for hd_curves.py's runs at a checkpoint:

  1 step                 x = e - u(e, 0, 1)
  2 steps, t_mid = m     z_m = e - (1 - m) u(e, m, 1), x = z_m - m u(z_m, 0, m)  (m = 0.5: uniform)
  2 steps, re-noised     x0 = e - u(e, 0, 1) (the trained map), z_m = (1 - m) x0 + m e', with
  at m                   fresh noise e', x = z_m - m u(z_m, 0, m) (the multistep sampling of
                         consistency models and DMD2: the second jump starts on the path the
                         MeanFlow identity describes, from the stage-2 sample)

Scored as hd_table.py scores (same reference, feature net, sample count). Beside them, the
MeanFlow residual of each model on each interval the paths read (stage 1's loss, per element,
against the guided teacher's target, on the same 512 training examples and noise): whether
stage 2 left the other intervals of the flow map where stage 1 put them. Writes
<out>/<experiment>/seed<S>/two_step.json and .md (two_step_<lever>.* with --lever).

  python benchmarks/two_step.py --experiment=digits --seed=0 --step=1200
  python benchmarks/two_step.py --experiment=digits_text --seed=0 --step=1200  # + captions

With captions (digits_text) each path's caption agreement is read too, and the samples' mean
stroke mass (the ink the stroke words are cut from) and the stroke words measured against
those asked: whether the second jump keeps the words asked for, and if not, which way it moves
them; and the ink each model's jump (0, m) gives real digits noised to m.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

# hd_curves' flags (--experiment, --variant, --set, --workdir, --out, --variants, --weights...).
from benchmarks import hd_curves  # noqa: E402
from benchmarks import hd_table  # noqa: E402
from hierdistill.data import digits_text as text_lib  # noqa: E402
import numpy as np  # noqa: E402

_SEED = flags.DEFINE_integer("seed", 0, "The seed whose runs are read.")
_STEP = flags.DEFINE_integer("step", 1200, "The stage-2 checkpoint read from each run.")
_MIDS = flags.DEFINE_list("mids", ["0.25", "0.5", "0.75"], "Intermediate times m tried.")


def samplers(chain, mids: list[float]) -> dict:
  """{name: (params, noise, c) -> samples} for the paths of the module doc."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hierdistill import sampling  # pylint: disable=g-import-not-at-top
  student = chain.nets.student

  def jump(params, c, z, r, t):
    """z_r = z_t - (t - r) u(z_t, r, t), for scalars r < t."""
    b = z.shape[0]
    r_, t_ = jnp.full((b,), r, z.dtype), jnp.full((b,), t, z.dtype)
    u = sampling.apply_model(student, params, z, r_, t_, c)
    return z - (t - r) * u.astype(z.dtype)

  def fresh_noise(noise):
    """e' independent of e, and fixed per sample: drawn from a key made of e's own bits, so
    every row of every run re-noises sample i with the same e'."""
    bits = jax.lax.bitcast_convert_type(noise.reshape(noise.shape[0], -1)[:, 0], jnp.int32)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(20261206), s))(bits)
    return jax.vmap(lambda k: jax.random.normal(k, noise.shape[1:], noise.dtype))(keys)

  out = {"1 step": lambda p, e, c: jump(p, c, e, 0.0, 1.0)}
  for m in mids:
    out[f"2 steps, t_mid {m:g}"] = (
        lambda p, e, c, m=m: jump(p, c, jump(p, c, e, m, 1.0), 0.0, m))
  for m in mids:
    def renoised(p, e, c, m=m):
      x0 = jump(p, c, e, 0.0, 1.0)
      return jump(p, c, (1.0 - m) * x0 + m * fresh_noise(e), 0.0, m)
    out[f"2 steps, re-noised at {m:g}"] = renoised
  return out


def stroke_words(samples, asks, thresholds) -> dict:
  """{'stroke_mass': the samples' mean ink, 'stroke_confusion': [asked][measured] shares of the
  stroke words (thin, regular, bold)}: which way a path moves the words it loses."""
  attributes = text_lib.measure_attributes(samples)
  measured = text_lib.bucket(attributes, asks[:, 0], thresholds)[:, 0]
  counts = np.zeros((3, 3))
  np.add.at(counts, (asks[:, 1], measured), 1)
  shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  return {"stroke_mass": float(np.mean(attributes[:, 0])),
          "stroke_confusion": np.round(shares, 3).tolist()}


def data_jump_stroke_mass(chain, params, mids, n: int = 1024) -> dict:
  """{'m': mean stroke mass of z_m - m u(z_m, 0, m)} with z_m = (1 - m) x + m e, x the first n
  training digits with their captions: the ink the jump (0, m) adds to real data noised to m,
  whatever a sampler would have fed it (their own mass: key 'data')."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hierdistill import sampling  # pylint: disable=g-import-not-at-top
  x, c = training_examples(chain, n)
  e = jax.random.normal(jax.random.PRNGKey(20261207), x.shape)
  mass = lambda a: float(np.mean(text_lib.measure_attributes(np.asarray(a))[:, 0]))
  out = {"data": mass(x)}
  for m in mids:
    z = (1.0 - m) * x + m * e
    u = sampling.apply_model(chain.nets.student, params, z, jnp.zeros((n,)), jnp.full((n,), m), c)
    out[f"{m:g}"] = mass(z - m * u.astype(z.dtype))
  return out


def training_examples(chain, n: int):
  """(x, c) of the first n training examples, c the conditions the stages train with: the
  captions' encodings for text, else the labels."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  conditions = getattr(chain.source, "encoded", chain.source.y)
  return (jnp.asarray(chain.source.x[:n], jnp.float32),
          jax.tree.map(lambda a: jnp.asarray(a[:n]), conditions))


def meanflow_residuals(chain, params, intervals, n: int = 512) -> dict:
  """{'(r, t)': mean squared MeanFlow residual per element} of params on each interval, on the
  first n training examples with fixed noise."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hierdistill.stages.trajectory import TrajectoryStage  # pylint: disable=g-import-not-at-top
  stage = TrajectoryStage(chain.config, chain.nets.student, chain.nets.teacher,
                          chain.nets.conditions)
  x, c = training_examples(chain, n)
  noise = jax.random.normal(jax.random.PRNGKey(20261206), x.shape)
  out = {}
  for r, t in intervals:
    draws = {"r": jnp.full((n,), r), "t": jnp.full((n,), t), "noise": noise}
    _, metrics = jax.jit(stage.loss_of_draws)(params, chain.frozen_teacher, x, c, draws)
    out[f"({r:g}, {t:g})"] = float(metrics["meanflow_mse"])
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  from hierdistill.evaluation import driver  # pylint: disable=g-import-not-at-top

  seed, step = _SEED.value, _STEP.value
  base_dir, _ = hd_table.train_base(seed)
  chain = pipeline.Chain(hd_table._config(seed), base_dir)
  ev = chain.source.make_scorer(chain)  # the launch eval's scorer (captions: agreement too)
  fns = samplers(chain, [float(m) for m in _MIDS.value])
  models = {"TD only (stage 1)": chain.load_export("trajectory")}
  abstract, shardings = chain.exported_shapes("distribution")
  for variant, weight in hd_curves.runs_of(seed):
    vdir = hd_curves.run_dir(seed, variant, weight)
    if os.path.isdir(os.path.join(vdir, "distribution", "checkpoints", str(step))):
      models[f"{hd_curves.run_name(variant, weight)} @ {step}"] = hd_curves.ema_params_at(
          vdir, step, abstract, shardings)
  fd = ev.scorer.feature_name
  mids = [float(m) for m in _MIDS.value]
  intervals = [(0.0, 1.0)] + [(m, 1.0) for m in mids] + [(0.0, m) for m in mids]
  residuals = {}
  for model, params in models.items():
    residuals[model] = meanflow_residuals(chain, params, intervals)
    print(f"[two_step] {model}: MeanFlow residual {residuals[model]}", flush=True)
  rows = []
  for model, params in models.items():
    for path, fn in fns.items():
      nfe = 1 if path == "1 step" else 2
      row, samples = driver.measure_row(ev, f"{model}: {path}", nfe, fn, params)
      row.update(model_name=model, path=path)
      if "caption_agreement" in row:  # the ink a path leaves: the stroke words are cut from it
        row.update(stroke_words(samples, ev.asks, chain.source.thresholds))
      rows.append(row)
      words = (f" caption_agreement {row['caption_agreement']:.3f}"
               if "caption_agreement" in row else "")
      print(f"[two_step] {model}: {path}: {fd} {row[fd]:.3f} precision {row['precision']:.3f} "
            f"recall {row['recall']:.3f}{words}", flush=True)
  out_dir = os.path.join(hd_curves.experiment_dir(), f"seed{seed}")
  os.makedirs(out_dir, exist_ok=True)
  # --lever reads that lever's runs: their own files, beside the plain runs'.
  lever = flags.FLAGS.lever
  name = "two_step" + (("_" + lever).replace(" ", "_") if lever else "")
  # With captions: the ink each model's jump (0, m) adds to real digits noised to m.
  data_jumps = ({model: data_jump_stroke_mass(chain, params, mids)
                 for model, params in models.items()} if "caption_agreement" in rows[0] else {})
  hd_curves.save_json({"rows": rows, "meanflow_residuals": residuals,
                       "data_jump_stroke_mass": data_jumps},
                      os.path.join(out_dir, name + ".json"))
  paths = list(fns)
  lines = ["| model | " + " | ".join(paths) + " |", "|---" + "|---:" * len(paths) + "|"]
  for model in models:
    cells = [f"{r[fd]:.2f}" for p in paths for r in rows
             if r["model_name"] == model and r["path"] == p]
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  if "caption_agreement" in rows[0]:  # text: whether each path keeps the words asked for
    lines += ["", "Caption agreement (stroke / slant alone; mean stroke mass) by sampling path",
              "", "| model | " + " | ".join(paths) + " |", "|---" + "|---:" * len(paths) + "|"]
    for model in models:
      cells = [f"{r['caption_agreement']:.3f} ({r['stroke_agreement']:.2f} / "
               f"{r['slant_agreement']:.2f}; {r['stroke_mass']:.1f})" for p in paths for r in rows
               if r["model_name"] == model and r["path"] == p]
      lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "Stroke words measured, by the word asked: thin / regular / bold asked, each "
              "as the shares measured thin-regular-bold", "",
              "| model | " + " | ".join(paths) + " |", "|---" + "|---" * len(paths) + "|"]
    for model in models:
      cells = [" / ".join("-".join(f"{v:.2f}" for v in asked) for asked in r["stroke_confusion"])
               for p in paths for r in rows if r["model_name"] == model and r["path"] == p]
      lines.append(f"| {model} | " + " | ".join(cells) + " |")
    keys = list(next(iter(data_jumps.values())))
    lines += ["", "Mean stroke mass of the jump (0, m) from training digits noised to m "
              "(column 'data': the digits' own)", "",
              "| model | " + " | ".join(keys) + " |", "|---" + "|---:" * len(keys) + "|"]
    for model, masses in data_jumps.items():
      lines.append(f"| {model} | " + " | ".join(f"{masses[k]:.2f}" for k in keys) + " |")
  keys = list(next(iter(residuals.values())))
  lines += ["", "MeanFlow residual (per element) by interval (r, t)", "",
            "| model | " + " | ".join(keys) + " |", "|---" + "|---:" * len(keys) + "|"]
  for model, res in residuals.items():
    lines.append(f"| {model} | " + " | ".join(f"{res[k]:.4f}" for k in keys) + " |")
  text = f"{fd} by sampling path (seed {seed})\n\n" + "\n".join(lines)
  with open(os.path.join(out_dir, name + ".md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
