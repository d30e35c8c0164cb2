"""The paper's comparison in miniature: what each stage of Hierarchical Distillation buys.

For each seed: train the teacher and stage 1 once, then five stage-2 variants from them, and
score every model with the same noise, labels, reference set, feature net and sample count:

  teacher (N steps) | teacher (1 step) | TD only (stage 1) | DMD only (stage 2 from the teacher,
  no adversarial term) | DMD + AWD, no stage 1 (from the teacher) | HD without the adversarial
  term | HD + mean-pooled discriminator | HD + AWD | TD only and HD + AWD in two steps

Prints a markdown table of mean +- std over seeds, writes it (and the per-seed rows as JSON) under
the workdir, and for the first seed a grid per row (for 2-D data a scatter plot over the real
data) plus <experiment>_teacher_vs_HD_plus_AWD.png: the teacher's N-step grid (left) beside HD +
AWD's one-step grid (right), and <experiment>_awd_weights.png: where HD + AWD's discriminator
puts its token weights on its one-step grid (awd_view.py). Every row draws sample i from the
same noise and label (the eval's noise depends only on i and the config's seed), so the two
grids show the same noise's image.

  python benchmarks/hd_table.py --experiment=digits --seeds=0,1,2
  python benchmarks/hd_table.py --experiment=digits --variant=tiny --seeds=0  # a quick check
  python benchmarks/hd_table.py --experiment=fashion --seeds=0,1,2
  python benchmarks/hd_table.py --experiment=toy2d --seeds=0,1,2

Fashion-MNIST needs its IDX files (experiments/fashion.py says where from).

Rerunning resumes: finished trainings are reused. 'train_s' is the wall time of the training a
row needs beyond the teacher (teacher rows: the teacher's own), measured in the run that trained.
"""
import ast
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

_EXPERIMENT = flags.DEFINE_enum("experiment", "digits",
                                ["digits", "digits_text", "fashion", "toy2d"],
                                "Which experiment (experiments/<name>.py).")
_VARIANT = flags.DEFINE_string("variant", "", "The experiment's variant (the arg after the "
                               "colon of --config), e.g. 'long'; '' = its default.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one full comparison each.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/hd_table", "Where the runs and tables go.")
_SET = flags.DEFINE_multi_string(
    "set", [], "Config overrides for every run, e.g. --set=distribution.num_steps=200.")

# Stage-2 variants: overrides of config.distribution.
VARIANTS = {
    "DMD only": dict(init_from="teacher", gen_adv_weight=0.0, disc_weight=0.0),
    # DMD2's recipe: stage 2 with its adversarial term, started from the teacher: what the sketch
    # of stage 1 adds once the adversarial term is strong.
    "DMD + AWD, no stage 1": dict(init_from="teacher"),
    "HD, no adversarial term": dict(gen_adv_weight=0.0, disc_weight=0.0),
    "HD + mean-pooled discriminator": {"discriminator.pooling": "mean"},
    "HD + AWD": {},
}
# Per-class coverage (class_coverage, class_tv: evaluation/coverage.py) in every row: the
# samples' label histogram against the data's, where mode dropping shows when no label hides it.
METRICS = {
    "digits": ("FD-digits", "precision", "recall", "class_accuracy", "class_coverage",
               "class_tv"),
    # The class is the digit the caption names; caption agreement: both words measured as asked.
    "digits_text": ("FD-digits", "precision", "recall", "class_accuracy", "caption_agreement",
                    "stroke_agreement", "slant_agreement", "class_tv"),
    # FD-fashion: the Frechet distance in Fashion-MNIST's own classifier's features (not FID).
    "fashion": ("FD-fashion", "precision", "recall", "class_accuracy", "class_coverage",
                "class_tv"),
    "toy2d": ("FD-points", "precision", "recall", "mode_coverage", "off_mode_fraction",
              "class_tv"),
}


def _config(seed: int):
  if _EXPERIMENT.value == "digits":
    from experiments import digits as exp  # pylint: disable=g-import-not-at-top
  elif _EXPERIMENT.value == "digits_text":
    from experiments import digits_text as exp  # pylint: disable=g-import-not-at-top
  elif _EXPERIMENT.value == "fashion":
    from experiments import fashion as exp  # pylint: disable=g-import-not-at-top
  else:
    from experiments import toy2d as exp  # pylint: disable=g-import-not-at-top
  config = exp.get_config(_VARIANT.value or None)
  config.seed = seed
  for item in _SET.value:
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value if isinstance(node[leaf], str) else ast.literal_eval(value)
  return config


def _experiment_name() -> str:
  return _EXPERIMENT.value + (f"_{_VARIANT.value}" if _VARIANT.value else "")


def _apply(config, overrides):
  for key, value in overrides.items():
    node = config.distribution
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _train(config, workdir, stages):
  """Runs `stages` under workdir; returns their wall times (kept across reruns in times.json)."""
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  times_path = os.path.join(workdir, "times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  config.stages = stages
  summary = pipeline.run(config, workdir)
  for name, s in summary["stages"].items():
    if s["status"] == "trained":
      times[name] = s["wall_time_s"]
  with open(times_path, "w") as f:
    json.dump(times, f)
  return times


def slug(name: str) -> str:
  """A row's name as a file name: 'HD + AWD' -> 'HD_plus_AWD'."""
  return name.replace(" ", "_").replace(",", "").replace("+", "plus")


def train_base(seed: int) -> tuple[str, dict]:
  """The seed's teacher and stage 1 under --workdir (trained once, then reused by every script
  that builds on this one): (their workdir, their wall times)."""
  base_dir = os.path.join(_WORKDIR.value, _experiment_name(), f"seed{seed}", "base")
  return base_dir, _train(_config(seed), base_dir, ("teacher", "trajectory"))


def copy_base(base_dir: str, vdir: str) -> None:
  """The shared upstream (teacher, stage 1) copied into a stage-2 run's workdir, once."""
  for stage in ("teacher", "trajectory"):
    if not os.path.exists(os.path.join(vdir, stage)):
      shutil.copytree(os.path.join(base_dir, stage), os.path.join(vdir, stage))


def run_seed(seed: int, out_dir: str) -> list[dict]:
  from hierdistill import awd_view, pipeline  # pylint: disable=g-import-not-at-top

  root = os.path.join(_WORKDIR.value, _experiment_name(), f"seed{seed}")
  base_dir, base_times = train_base(seed)
  variant_times = {}
  for name, overrides in VARIANTS.items():
    vdir = os.path.join(root, slug(name))
    copy_base(base_dir, vdir)
    variant_times[name] = (vdir, _train(_apply(_config(seed), overrides), vdir,
                                        ("distribution",)).get("distribution", float("nan")))

  chain = pipeline.Chain(_config(seed), base_dir)
  ev = chain.source.make_scorer(chain)  # the launch eval's scorer (captions: agreement too)
  teacher = chain.load_export("teacher")
  n = int(chain.config.sample.teacher_steps)
  rows = []
  grid_paths = {}

  def add(row, train_s):
    row["train_s"] = train_s
    rows.append(row)
    print(f"[hd_table seed {seed}] {row}", flush=True)
    if seed == int(_SEEDS.value[0]):
      name, steps = row["model"].split(" (")[0], row["model"].rsplit(" (", 1)[1].rstrip(")")
      if name == "teacher" or steps != "1 step":  # rows that differ only by the step count
        name = f"{name} {steps}"
      grid_paths[row["model"]] = os.path.join(out_dir,
                                              f"{_EXPERIMENT.value}_{slug(name)}.png")
      ev.save_grid(ev.last_samples[:int(chain.config.sample.grid_size)],
                   grid_paths[row["model"]])

  add(ev.teacher(teacher, n), base_times.get("teacher", float("nan")))
  add(ev.teacher(teacher, 1, name="teacher (1 step)"), base_times.get("teacher", float("nan")))
  add(ev.student(chain.load_export("trajectory"), 1, "TD only (stage 1)"),
      base_times.get("trajectory", float("nan")))
  for name, (vdir, stage2_s) in variant_times.items():
    vchain = pipeline.Chain(_apply(_config(seed), VARIANTS[name]), vdir)
    upstream = 0.0 if VARIANTS[name].get("init_from") == "teacher" else base_times.get(
        "trajectory", float("nan"))
    add(ev.student(vchain.load_export("distribution"), 1, name), upstream + stage2_s)
    if name == "HD + AWD":
      hd_chain = vchain
  # Two steps: stage 2 trains only the one-step map; its two-step samples should still be no
  # worse than stage 1's.
  add(ev.student(chain.load_export("trajectory"), 2, "TD only (stage 1)"),
      base_times.get("trajectory", float("nan")))
  add(ev.student(hd_chain.load_export("distribution"), 2, "HD + AWD"),
      next(r["train_s"] for r in rows if r["model"] == "HD + AWD (1 step)"))
  if seed == int(_SEEDS.value[0]) and chain.config.model.name == "dit":
    # Where the AWD's token weights land (awd_view.py), on the grid's noise and labels.
    _, means = awd_view.render_awd_overlay(
        hd_chain, os.path.join(out_dir, f"{_EXPERIMENT.value}_awd_weights.png"))
    print(f"[hd_table seed {seed}] AWD token weights: {means}", flush=True)
  if grid_paths:
    hd = next(m for m in grid_paths if m.startswith("HD + AWD"))
    side_by_side([grid_paths[rows[0]["model"]], grid_paths[hd]],
                 os.path.join(out_dir, f"{_EXPERIMENT.value}_teacher_vs_HD_plus_AWD.png"))
  return rows


def side_by_side(paths: list[str], out_path: str, gap: int = 16) -> None:
  """The PNGs at paths in one row, left to right, on white, `gap` pixels apart."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = [Image.open(p).convert("RGB") for p in paths]
  width = sum(im.width for im in images) + gap * (len(images) - 1)
  canvas = Image.new("RGB", (width, max(im.height for im in images)), "white")
  left = 0
  for im in images:
    canvas.paste(im, (left, 0))
    left += im.width + gap
  canvas.save(out_path, format="PNG")


def table(per_seed: list[list[dict]]) -> str:
  # An unconditional variant has no class_accuracy: only the columns every row has.
  cols = tuple(c for c in METRICS[_EXPERIMENT.value] + ("nfe", "train_s")
               if all(c in row for rows in per_seed for row in rows))
  lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for i, row in enumerate(per_seed[0]):
    cells = []
    for c in cols:
      values = np.array([rows[i][c] for rows in per_seed], np.float64)
      if c == "nfe":
        cells.append(f"{int(values[0])}")
      elif c == "train_s":
        cells.append(f"{np.mean(values):.0f}")
      else:
        cells.append(f"{np.mean(values):.3f} +- {np.std(values):.3f}")
    lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  out_dir = os.path.join(_WORKDIR.value, _experiment_name())
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  per_seed = [run_seed(int(s), out_dir) for s in _SEEDS.value]
  text = (f"{_EXPERIMENT.value}, seeds {','.join(_SEEDS.value)}, mean +- std; "
          f"total wall time {time.time() - t0:.0f} s\n\n" + table(per_seed))
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out_dir, "rows.json"), "w") as f:
    json.dump(per_seed, f, indent=2)
  print(text)


if __name__ == "__main__":
  app.run(main)
