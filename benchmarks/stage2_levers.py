"""Which of stage 2's settings move the one-step result: learning curves of named levers.

For one seed, the teacher and stage 1 are trained once; then each lever (a set of config
overrides) trains stage 2 from them, and the one- and two-step samples are scored after each
of the --steps counts (one run per lever, extended: a stage's num_steps may grow on resume, and
the optimisers' rates are constant after warm-up, so the curve is one long run read at points).
Every row uses the same noise, labels, reference set, feature net and sample count as
hd_table.py. Writes runs/stage2_levers/<experiment>/seed<S>/levers.md and levers.json.

  python benchmarks/stage2_levers.py --experiment=digits --seed=0 --steps=400,1200
  python benchmarks/stage2_levers.py --levers="default,k=5" --steps=400

Levers that change the base (stage 1 or the teacher) are not here: hd_table.py's --set does that.
"""
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

from benchmarks import hd_table  # noqa: E402  (its --experiment, --set and config helpers)
from benchmarks.levers import LEVERS  # noqa: E402
from benchmarks.levers import overrides_of  # noqa: E402

_LEVERS = flags.DEFINE_list("levers", list(LEVERS), "Levers to run (names of LEVERS, or "
                            "'+'-joined names to combine them, e.g. 'lr 3e-4+adv x100').")
_SEED = flags.DEFINE_integer("seed", 0, "The seed of the base (teacher, stage 1) and stage 2.")
_STEPS = flags.DEFINE_list("steps", ["400"], "Stage-2 step counts at which to score.")
_OUT = flags.DEFINE_string("out", "runs/stage2_levers", "Where the runs and tables go.")


def slug(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top

  seed, steps = _SEED.value, [int(s) for s in _STEPS.value]
  root = os.path.join(_OUT.value, hd_table._EXPERIMENT.value, f"seed{seed}")
  base_dir = os.path.join(root, "base")
  hd_table._train(hd_table._config(seed), base_dir, ("teacher", "trajectory"))
  chain = pipeline.Chain(hd_table._config(seed), base_dir)
  ev = chain.source.make_scorer(chain)  # the launch eval's scorer (captions: agreement too)
  json_path = os.path.join(root, "levers.json")
  rows = json.load(open(json_path)) if os.path.exists(json_path) else []
  done = {(r["lever"], r["steps"]) for r in rows}
  if not any(r["lever"] == "TD only (stage 1)" for r in rows):
    for n in (1, 2):
      rows.append(dict(ev.student(chain.load_export("trajectory"), n, "stage 1"),
                       lever="TD only (stage 1)", steps=0, train_s=0.0))
  for name in _LEVERS.value:
    overrides = overrides_of(name)
    vdir = os.path.join(root, slug(name))
    for stage in ("teacher", "trajectory"):
      if not os.path.exists(os.path.join(vdir, stage)):
        shutil.copytree(os.path.join(base_dir, stage), os.path.join(vdir, stage))
    for n_steps in steps:
      if (name, n_steps) in done:
        continue
      config = hd_table._apply(hd_table._config(seed), overrides)
      config.distribution.num_steps = n_steps
      t0 = time.time()
      hd_table._train(config, vdir, ("distribution",))
      train_s = time.time() - t0
      vchain = pipeline.Chain(config, vdir)
      params = vchain.load_export("distribution")
      for n in (1, 2):
        row = dict(ev.student(params, n, "stage 2"), lever=name, steps=n_steps, train_s=train_s)
        rows.append(row)
        print(f"[levers] {name} @ {n_steps}: {row}", flush=True)
      with open(json_path, "w") as f:
        json.dump(rows, f, indent=2)
  with open(json_path, "w") as f:
    json.dump(rows, f, indent=2)
  text = table(rows, hd_table.METRICS[hd_table._EXPERIMENT.value])
  with open(os.path.join(root, "levers.md"), "w") as f:
    f.write(text + "\n")
  print(text)


def table(rows: list[dict], metrics) -> str:
  fd, recall = metrics[0], "recall"
  lines = [f"| lever | stage-2 steps | {fd} (1 step) | recall (1 step) | {fd} (2 steps) | "
           "train_s |", "|---|---:|---:|---:|---:|---:|"]
  by_key = {}
  for r in rows:
    by_key.setdefault((r["lever"], r["steps"]), {})[r["nfe"]] = r
  for (lever, n_steps), r in by_key.items():
    one, two = r.get(1, {}), r.get(2, {})
    lines.append(f"| {lever} | {n_steps} | {one.get(fd, float('nan')):.3f} | "
                 f"{one.get(recall, float('nan')):.3f} | {two.get(fd, float('nan')):.3f} | "
                 f"{one.get('train_s', 0.0):.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
