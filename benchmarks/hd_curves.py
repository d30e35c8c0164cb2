"""Curves, not points: each stage-2 variant of hd_table.py read every --every steps to --steps.

For each seed, the teacher and stage 1 of hd_table.py (trained once under its --workdir, reused)
start every stage-2 variant: HD + AWD, HD + mean-pooled head, HD without the adversarial term,
DMD + AWD from the teacher, DMD only. Each variant trains once to --steps with a checkpoint every
--every steps, all kept; the EMA generator of each checkpoint (and the start, step 0) is scored
in one and two steps with the same noise, labels, reference set, feature net and sample count as
hd_table.py: FD, precision, recall, and per-class coverage (evaluation/coverage.py).

Training cost: each point's stage-2 steps times the stage-2 step's cost, plus stage 1's whole
run for the variants that start from it, in forward passes of the student at the stage's batch,
the unit of step_cost.py (step_cost.forwards_per_step: XLA's FLOPs of this config's compiled
steps). The teacher, shared by every variant, is not counted.

  python benchmarks/hd_curves.py --experiment=digits --seeds=0
  python benchmarks/hd_curves.py --experiment=digits --seeds=0 --weights=0.3,0.9,3.0  # the sweep
  python benchmarks/hd_curves.py --experiment=digits --seeds=1,2 --weights=best
  python benchmarks/hd_curves.py --experiment=digits --variant=unconditional --seeds=0
  python benchmarks/hd_curves.py --experiment=digits --seeds=0,1,2 --plot_only
  python benchmarks/hd_curves.py --experiment=digits_text --seeds=0  # + caption agreement

--weights: the adversarial weights (config.distribution.gen_adv_weight) of the variants that have
the adversarial term; 'best' takes, per variant, the weight whose one-step FD at --steps was the
lowest on --choose_seed (run the sweep there first), so no row rests on a weight tuned for
another. Variants without the term run once whatever --weights says.

Everything resumes: a run trains in chunks of --chunk steps (a killed chunk resumes from its last
checkpoint) and its scored points are kept in points.json beside it, so a rerun trains and
scores only what is missing. Writes under --out/<experiment>: curves.md (the table), curves.json
(every point of every seed), PNG plots (FD against stage-2 step and against training cost, two
steps, recall and class coverage, and with captions the caption agreement in one and two steps;
seeds as bands: mean and min-max), step_cost.json.
'train_s' is a run's stage-2 wall time (the chunks that trained, on the machine as it was).
"""
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

# hd_table's flags: --experiment, --variant, --set, --seeds, and --workdir (where the teacher
# and stage 1 of each seed are trained once).
from benchmarks import hd_table  # noqa: E402
from benchmarks import levers  # noqa: E402

_SEEDS = hd_table._SEEDS
_VARIANTS = flags.DEFINE_list("variants", list(hd_table.VARIANTS),
                              "Stage-2 variants (names of hd_table.VARIANTS).")
_WEIGHTS = flags.DEFINE_list("weights", [], "Adversarial weights to run the adversarial variants "
                             "at; empty = the experiment's; 'best' = chosen on --choose_seed.")
_LEVER = flags.DEFINE_string("lever", "", "A stage-2 lever (levers.LEVERS, '+'-joined) applied "
                             "to every run on top of its variant; '' = none. Runs with a "
                             "lever are named and kept apart.")
_CHOOSE_SEED = flags.DEFINE_integer("choose_seed", 0, "The seed --weights=best reads.")
_CHOOSE_STEP = flags.DEFINE_integer("choose_step", 0, "The stage-2 step --weights=best reads "
                                    "(0 = --steps): the sweep may be shorter than the runs.")
_STEPS = flags.DEFINE_integer("steps", 1200, "Stage-2 steps of every run.")
_EVERY = flags.DEFINE_integer("every", 100, "Score (and checkpoint) every this many steps.")
_CHUNK = flags.DEFINE_integer("chunk", 400, "Train this many steps, then score what they left.")
_NFE = flags.DEFINE_list("nfe", ["1", "2"], "Sampling steps each point is scored at.")
_OUT = flags.DEFINE_string("out", "runs/hd_curves", "Where the runs, tables and plots go.")
_ONLY = flags.DEFINE_string("only", "", "A regular expression: the table and plots show only the "
                            "runs whose name it matches (e.g. '@ adv|^HD \\+ AWD$').")
_TAG = flags.DEFINE_string("tag", "", "Appended to the table's and plots' file names.")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Train and score nothing: tables and plots "
                               "from the points scored so far.")


def default_weight(seed: int) -> float:
  return float(hd_table._config(seed).distribution.gen_adv_weight)


def is_adversarial(variant: str, seed: int) -> bool:
  return hd_table.VARIANTS[variant].get("gen_adv_weight", default_weight(seed)) > 0


def runs_of(seed: int) -> list[tuple[str, float | None]]:
  """(variant, adversarial weight; None for a variant without the term) pairs to run on `seed`.

  An adversarial variant always carries its weight, the experiment's own included, so a run
  keeps its name and its directory when the experiment's default weight changes.
  """
  out = []
  for variant in _VARIANTS.value:
    if variant not in hd_table.VARIANTS:
      raise ValueError(f"unknown variant {variant!r}; choose from {list(hd_table.VARIANTS)}")
    if not is_adversarial(variant, seed):
      weights = [None]
    elif not _WEIGHTS.value:
      weights = [default_weight(seed)]
    elif _WEIGHTS.value == ["best"]:
      weights = [best_weight(variant)]
    else:
      weights = [float(w) for w in _WEIGHTS.value]
    out += [(variant, w) for w in weights]
  return out


def run_name(variant: str, weight: float | None, lever: str | None = None) -> str:
  """'HD + AWD @ adv 0.1 + <lever>': the variant, its adversarial weight, its lever."""
  lever = _LEVER.value if lever is None else lever
  name = variant if weight is None else f"{variant} @ adv {weight:g}"
  return name + (f" + {lever}" if lever else "")


def record_name(record: dict) -> str:
  """The run_name of a stored points.json, whichever release named it: earlier ones left the
  weight out at the experiment's default and stored that default for variants without the term."""
  weight = hd_table.VARIANTS[record["variant"]].get("gen_adv_weight", record["gen_adv_weight"])
  return run_name(record["variant"], weight if weight > 0 else None, record.get("lever", ""))


def experiment_dir() -> str:
  return os.path.join(_OUT.value, hd_table._experiment_name())


def run_dir(seed: int, variant: str, weight: float | None) -> str:
  lever = ""
  if _LEVER.value:
    lever = "_" + "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in _LEVER.value)
  base = os.path.join(experiment_dir(), f"seed{seed}", hd_table.slug(variant))
  path = base + ("" if weight is None else f"_adv{weight:g}") + lever
  # Earlier releases kept a run at the experiment's default weight without the suffix; such a
  # run is found by the weight its own config.json stored.
  former = base + lever
  if weight is not None and not os.path.exists(path) and os.path.exists(former):
    stored = json.load(open(os.path.join(former, "config.json")))["distribution"]
    if float(stored["gen_adv_weight"]) == weight:
      return former
  return path


def run_config(seed: int, variant: str, weight: float | None, num_steps: int):
  config = hd_table._apply(hd_table._config(seed), hd_table.VARIANTS[variant])
  config = hd_table._apply(config, levers.overrides_of(_LEVER.value) if _LEVER.value else {})
  if weight is not None:
    config.distribution.gen_adv_weight = weight
  d = config.distribution
  d.num_steps, d.checkpoint_every, d.log_every = num_steps, _EVERY.value, _EVERY.value
  d.keep = None  # every checkpoint is a point of the curve
  return config


def load_points(path: str) -> dict:
  return json.load(open(path)) if os.path.exists(path) else {"points": [], "chunks": {}}


def save_json(obj, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # a killed run never leaves half a file


def ema_params_at(vdir: str, step: int, abstract, shardings):
  """The EMA generator of stage 2's checkpoint at `step`, as the export would hold it."""
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = epath.Path(os.path.abspath(
      os.path.join(vdir, "distribution", "checkpoints", str(step), "state")))
  state = ocp.StandardCheckpointHandler().restore(path)  # as saved: only its EMA part is read
  ema = state["ema_params"]
  if jax.tree.structure(ema) != jax.tree.structure(abstract):
    raise ValueError(f"{path}: its ema_params do not have the generator's structure")
  return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), ema, shardings)


def train_and_score(seed: int, variant: str, weight, base_dir: str, ev, samplers) -> dict:
  """Trains the run in chunks to --steps, scoring each new checkpoint; returns points.json."""
  from hierdistill import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  from hierdistill.evaluation import driver  # pylint: disable=g-import-not-at-top

  vdir = run_dir(seed, variant, weight)
  hd_table.copy_base(base_dir, vdir)
  path = os.path.join(vdir, "points.json")
  record = load_points(path)
  record.update(run=run_name(variant, weight), variant=variant, lever=_LEVER.value, seed=seed,
                gen_adv_weight=float(run_config(seed, variant, weight, 0).distribution
                                     .gen_adv_weight))
  every, total = _EVERY.value, _STEPS.value
  targets = sorted({min(c, total) for c in range(_CHUNK.value, total + _CHUNK.value,
                                                 _CHUNK.value)})
  for target in targets:
    saved = ckpt_lib.saved_steps(vdir, "distribution")
    if not (saved and saved[-1] >= target):
      config = run_config(seed, variant, weight, target)
      t0 = time.time()
      hd_table._train(config, vdir, ("distribution",))
      record["chunks"][str(target)] = round(time.time() - t0, 1)
      save_json(record, path)
    # A run trained further by an earlier command (a longer --steps) is read, not cut back.
    saved = ckpt_lib.saved_steps(vdir, "distribution")
    chain = pipeline.Chain(run_config(seed, variant, weight, max([target] + saved)), vdir)
    abstract, shardings = chain.exported_shapes("distribution")
    done = {(p["step"], p["nfe"]) for p in record["points"]}
    steps = [0] + [s for s in ckpt_lib.saved_steps(vdir, "distribution")
                   if s % every == 0 and s <= target]
    for step in steps:
      todo = [n for n in samplers if (step, n) not in done]
      if not todo:
        continue
      params = (chain.handoff("distribution")["generator"] if step == 0
                else ema_params_at(vdir, step, abstract, shardings))
      for n in todo:
        row, samples = driver.measure_row(ev, f"{record['run']} ({driver.steps_label(n)})", n,
                                          samplers[n], params)
        row.update(step=step, class_histogram=ev.scorer.class_histogram(samples).tolist())
        record["points"].append(row)
        print(f"[hd_curves seed {seed}] {record['run']} step {step} nfe {n}: "
              f"{ev.scorer.feature_name} {row[ev.scorer.feature_name]:.3f} recall "
              f"{row['recall']:.3f} class_tv {row['class_tv']:.3f}", flush=True)
      record["points"].sort(key=lambda p: (p["step"], p["nfe"]))
      save_json(record, path)
  return record


def reference_rows(seed: int, base_dir: str, ev, samplers) -> dict:
  """The teacher (N steps) and stage 1 alone (one and two steps): the curves' reference lines."""
  from hierdistill.evaluation import driver  # pylint: disable=g-import-not-at-top
  path = os.path.join(experiment_dir(), f"seed{seed}", "reference.json")
  if os.path.exists(path):
    return json.load(open(path))
  chain = ev.chain
  n = int(chain.config.sample.teacher_steps)
  rows = {"teacher": ev.teacher(chain.load_export("teacher"), n)}
  for k in samplers:
    rows[f"TD only ({k})"] = driver.measure_row(ev, f"TD only ({driver.steps_label(k)})", k,
                                                samplers[k], chain.load_export("trajectory"))[0]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_json(rows, path)
  return rows


def run_seed(seed: int) -> None:
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  from hierdistill.evaluation import driver  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  base_dir, base_times = hd_table.train_base(seed)
  chain = pipeline.Chain(hd_table._config(seed), base_dir)
  ev = chain.source.make_scorer(chain)  # the launch eval's scorer (captions: agreement too)
  # One sampler a step count, so that each compiles once for every point.
  samplers = {int(n): driver.student_sampler(chain, int(n)) for n in _NFE.value}
  reference_rows(seed, base_dir, ev, samplers)
  save_json(base_times, os.path.join(experiment_dir(), f"seed{seed}", "base_times.json"))
  for variant, weight in runs_of(seed):
    t_run = time.time()
    train_and_score(seed, variant, weight, base_dir, ev, samplers)
    print(f"[hd_curves seed {seed}] {run_name(variant, weight)} done in "
          f"{time.time() - t_run:.0f} s", flush=True)
  print(f"[hd_curves seed {seed}] all runs in {time.time() - t0:.0f} s", flush=True)


def cost_key(record: dict) -> str:
  """Runs that compute the same step share a cost: the variant and the lever decide it."""
  return record["variant"] + (f" + {record['lever']}" if record.get("lever") else "")


def step_costs(runs: dict, seed: int) -> dict:
  """Forwards per step of stage 1 and of each run's stage 2 (cached in step_cost.json)."""
  path = os.path.join(experiment_dir(), "step_cost.json")
  costs = json.load(open(path)) if os.path.exists(path) else {}
  records = {cost_key(r): r for by_seed in runs.values() for r in by_seed.values()}
  missing = [k for k in records if k not in costs]
  if missing:
    from benchmarks import step_cost  # pylint: disable=g-import-not-at-top
    from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
    from hierdistill import sources  # pylint: disable=g-import-not-at-top
    for key in missing:
      r = records[key]
      config = hd_table._apply(hd_table._config(seed), hd_table.VARIANTS[r["variant"]])
      if r.get("lever"):
        config = hd_table._apply(config, levers.overrides_of(r["lever"]))
      source = sources.source_class(config.data.name)
      nets = pipeline.Networks(config, source.condition_kind(config))  # labels or captions
      costs[key] = step_cost.forwards_per_step(config, nets, source.example_shape(config))
      print(f"[hd_curves] step cost, {key}: {costs[key]} forwards", flush=True)
    save_json(costs, path)
  return costs


def collect() -> dict:
  """{run name: {seed: points.json}} for every run scored so far under the experiment."""
  out = {}
  root = experiment_dir()
  for seed_dir in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    if not seed_dir.startswith("seed"):
      continue
    for name in sorted(os.listdir(os.path.join(root, seed_dir))):
      path = os.path.join(root, seed_dir, name, "points.json")
      if os.path.exists(path):
        record = json.load(open(path))
        name = record_name(record)
        if record["points"] and re.search(_ONLY.value, name):
          out.setdefault(name, {})[record["seed"]] = record
  return out


def curve(record: dict, metric: str, nfe: int) -> tuple[np.ndarray, np.ndarray]:
  pts = [p for p in record["points"] if p["nfe"] == nfe]
  return (np.array([p["step"] for p in pts], np.float64),
          np.array([p[metric] for p in pts], np.float64))


def best_weight(variant: str) -> float:
  """The adversarial weight of `variant` with the lowest one-step FD at --choose_step on
  --choose_seed; ValueError when that seed's sweep has not reached it."""
  fd = hd_table.METRICS[hd_table._EXPERIMENT.value][0]
  step = _CHOOSE_STEP.value or _STEPS.value
  scores = {}
  for record in collect().values():
    r = record.get(_CHOOSE_SEED.value)
    if r and r["variant"] == variant and not r.get("lever"):
      steps, values = curve(r, fd, 1)
      if step in steps:
        scores[r["gen_adv_weight"]] = float(values[steps == step][0])
  if len(scores) < 2:
    raise ValueError(f"--weights=best: the sweep of {variant!r} on seed {_CHOOSE_SEED.value} "
                     f"has {len(scores)} weight(s) scored at step {step}; run it first "
                     f"(--weights=0.3,0.9,3.0 --seeds={_CHOOSE_SEED.value} --steps={step}).")
  best = min(scores, key=scores.get)
  print(f"[hd_curves] {variant}: weight {best:g} chosen on seed {_CHOOSE_SEED.value} at step "
        f"{step} ({', '.join(f'{w:g}: {v:.3f}' for w, v in sorted(scores.items()))})", flush=True)
  return best


def _captioned(runs: dict) -> bool:
  """Whether the runs were scored with captions (digits_text): caption agreement is read too."""
  return any("caption_agreement" in p for by_seed in runs.values() for r in by_seed.values()
             for p in r["points"])


def summarise(runs: dict, costs: dict, references: dict) -> str:
  """The table: per run, mean +- std over seeds at chosen steps, and the first step at which
  the one-step FD reaches the FD of its own seed's teacher (N steps)."""
  fd = hd_table.METRICS[hd_table._EXPERIMENT.value][0]
  teacher = np.mean([r["teacher"][fd] for r in references.values()]) if references else math.nan
  marks = sorted({s for s in (100, 400, 800, _STEPS.value) if s <= _STEPS.value})
  captioned = _captioned(runs)
  head = ([f"{fd} 1 step @ {s}" for s in marks] + [f"{fd} 2 steps @ {_STEPS.value}",
          f"recall @ {_STEPS.value}", f"class_tv @ {_STEPS.value}"]
          + [f"caption agreement 1 / 2 steps @ {_STEPS.value}"] * captioned
          + [f"first step <= its seed's teacher (mean {teacher:.2f})", "stage-2 fwd/step", "seeds",
          "train_s"])
  lines = ["| run | " + " | ".join(head) + " |", "|---" + "|---:" * len(head) + "|"]

  def at(records, metric, nfe, step):
    vals = []
    for r in records:
      steps, values = curve(r, metric, nfe)
      vals += list(values[steps == step])
    if not vals:
      return "-"
    return f"{np.mean(vals):.2f} +- {np.std(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

  for name, by_seed in runs.items():
    records = list(by_seed.values())
    cells = [at(records, fd, 1, s) for s in marks]
    cells += [at(records, fd, 2, _STEPS.value), at(records, "recall", 1, _STEPS.value),
              at(records, "class_tv", 1, _STEPS.value)]
    if captioned:
      cells.append(" / ".join(at(records, "caption_agreement", n, _STEPS.value) for n in (1, 2)))
    firsts = []
    for r in records:
      steps, values = curve(r, fd, 1)
      # Seeds train their own teachers (20.5 and 22.2 FD-fashion apart): each curve is read
      # against its own.
      own = references.get(f"seed{r['seed']}", {}).get("teacher", {}).get(fd, teacher)
      below = steps[values <= own]
      firsts.append(str(int(below[0])) if len(below) else f"> {int(steps[-1])}")
    cells.append(", ".join(firsts))
    cells.append(f"{costs.get(cost_key(records[0]), {}).get('distribution', math.nan):.1f}")
    cells.append(",".join(str(s) for s in by_seed))
    cells.append(",".join(f"{sum(r['chunks'].values()):.0f}" for r in records))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def total_cost(record: dict, steps: np.ndarray, costs: dict, seed: int) -> np.ndarray:
  """Forward passes spent up to each point: stage 1's whole run (for the variants that start
  from it) plus the stage-2 steps."""
  c = costs[cost_key(record)]
  from_teacher = hd_table.VARIANTS[record["variant"]].get("init_from") == "teacher"
  stage1 = 0.0 if from_teacher else (
      int(hd_table._config(seed).trajectory.num_steps) * c["trajectory"])
  return stage1 + steps * c["distribution"]


def plot(runs: dict, costs: dict, references: dict, out_dir: str) -> list[str]:
  """PNG figures of the curves; returns their paths. Seeds: the mean line, a min-max band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fd = hd_table.METRICS[hd_table._EXPERIMENT.value][0]
  name = hd_table._experiment_name()
  paths = []

  def band(ax, xs, ys, label):
    """The mean over seeds and its min-max band; past the end of a shorter seed (a sweep run to
    fewer steps) the seeds that go on, so no seed's later points are cut."""
    n = max(len(y) for y in ys)
    x = next(x for x in xs if len(x) == n)
    at = [np.array([y[i] for y in ys if len(y) > i]) for i in range(n)]
    mean = np.array([a.mean() for a in at])
    seeds = f"{len(ys)} seed{'s' if len(ys) > 1 else ''}"
    if min(len(y) for y in ys) < n:
      seeds += f", {min(len(a) for a in at)} to the end"
    line, = ax.plot(x, mean, marker=".", label=f"{label} ({seeds})")
    if len(ys) > 1:
      ax.fill_between(x, [a.min() for a in at], [a.max() for a in at], color=line.get_color(),
                      alpha=0.2)

  def reference(ax, key, metric, style, label):
    vals = [r[key][metric] for r in references.values() if key in r]
    if vals:
      ax.axhline(np.mean(vals), color="grey", linestyle=style, linewidth=1, label=label)

  # The teacher's row names its sampling steps: "teacher (50 steps)".
  teacher_label = next((r["teacher"]["model"] for r in references.values() if "teacher" in r),
                       "teacher")
  figures = [("fd", fd, 1, f"{fd}, one step"), ("fd_two_steps", fd, 2, f"{fd}, two steps"),
             ("recall", "recall", 1, "recall, one step"),
             ("class_tv", "class_tv", 1, "class histogram's distance to the data's (TV)")]
  if _captioned(runs):
    figures += [("caption", "caption_agreement", 1, "caption agreement, one step"),
                ("caption_two_steps", "caption_agreement", 2, "caption agreement, two steps")]
  for slug, metric, nfe, title in figures:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for run, by_seed in runs.items():
      xs, xc, ys = [], [], []
      for seed, r in sorted(by_seed.items()):
        steps, values = curve(r, metric, nfe)
        if len(steps):
          xs.append(steps)
          xc.append(total_cost(r, steps, costs, seed) / 1e3)
          ys.append(values)
      if ys:
        band(axes[0], xs, ys, run)
        band(axes[1], xc, ys, run)
    for ax in axes:
      reference(ax, "teacher", metric, "--", teacher_label)
      reference(ax, f"TD only ({nfe})", metric, ":", f"TD only, {nfe} step(s)")
      ax.set_ylabel(title)
      ax.grid(alpha=0.3)
    if metric.startswith("FD"):
      for ax in axes:  # log scale, plain numbers on it
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].set_xlabel("stage-2 step")
    axes[1].set_xlabel("training cost, thousands of student forwards (stage 1 counted; "
                       "teacher not)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: {title}")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}_curves_{slug}{_TAG.value and '_' + _TAG.value}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  seeds = [int(s) for s in _SEEDS.value]
  if not _PLOT_ONLY.value:
    for seed in seeds:
      run_seed(seed)
  out_dir = experiment_dir()
  runs = collect()
  costs = step_costs(runs, seeds[0])
  references = {}
  for seed_dir in sorted(os.listdir(out_dir)):
    path = os.path.join(out_dir, seed_dir, "reference.json")
    if seed_dir.startswith("seed") and os.path.exists(path):
      references[seed_dir] = json.load(open(path))
  text = summarise(runs, costs, references)
  tag = _TAG.value and "_" + _TAG.value
  with open(os.path.join(out_dir, f"curves{tag}.md"), "w") as f:
    f.write(text + "\n")
  save_json({name: {str(s): r for s, r in by_seed.items()} for name, by_seed in runs.items()},
            os.path.join(out_dir, f"curves{tag}.json"))
  print(text)
  for path in plot(runs, costs, references, out_dir):
    print("plot:", path)


if __name__ == "__main__":
  app.run(main)
