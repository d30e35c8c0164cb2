"""The eval stage's driver: every model of the chain, sampled from the same noise and
conditions, measured against the same reference set with the same feature net and the same
sample count.

Rows (plan_rows): the teacher at each of config.eval.teacher_steps (its full count, and 1, 2, 4
steps, to show what a plain few-step teacher loses), the stage-1 student and the stage-2 student
at each of config.eval.student_steps. run_eval measures them and writes
<workdir>/eval/{metrics.json, metrics.md, samples_<row>.png}, TensorBoard scalars and a console
line per row. What is measured belongs to the data source (sources/): its scorer, made by
chain.source.make_scorer(chain), has
  measure(sample_fn, params, files_prefix) -> (metric columns, samples to draw): samples of
      sample_fn(params, noise, c), noise from eval_key and conditions from the source's
      eval_conditions; files_prefix (<workdir>/eval/samples_<row>, no extension) is where it may
      write more
  describe() -> what every row was measured with, stored beside the rows
  save_grid(samples, path) -> a PNG of the samples measure returned
The embedded data sets' scorer is evaluation/embedded.Evaluator; ImageNet's and the text
miniature's live with their sources. Every row also has the model's name, its NFE and its
sampling time.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax

from hierdistill import sampling

EVAL_SALT = 0xE7A1
STUDENT_LABELS = (("trajectory", "stage 1 (TD)"), ("distribution", "stage 2 (HD)"))


def eval_key(config) -> jax.Array:
  """One key for every row: the rows differ by the model alone, not by the noise."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_SALT)


# -- the rows ----------------------------------------------------------------------------------

def teacher_sampler(chain, num_steps: int) -> Callable:
  """(params, noise, c) -> samples of the teacher's ODE, with config.sample's solver and CFG
  against the source's null condition."""
  config, teacher, conditions = chain.config, chain.nets.teacher, chain.source.conditions

  def fn(params, noise, c):
    return sampling.sample_teacher_from_config(config, teacher, conditions, params, noise, c,
                                               num_steps=num_steps)
  return fn


def teacher_nfe(chain, num_steps: int) -> int:
  s = chain.config.sample
  return sampling.teacher_nfe(num_steps, s.teacher_method, s.cfg_scale)


def student_sampler(chain, num_steps: int) -> Callable:
  """(params, noise, c) -> samples of the flow map in num_steps jumps."""
  student = chain.nets.student

  def fn(params, noise, c):
    u_fn = lambda z, r, t: sampling.apply_model(student, params, z, r, t, c)
    return sampling.flow_map_sample(u_fn, noise, num_steps=num_steps)
  return fn


class Row(NamedTuple):
  name: str  # e.g. 'stage 2 (HD) (1 step)'
  stage: str  # whose params it samples: 'teacher', 'trajectory' or 'distribution'
  sample_fn: Callable  # (params, noise, c) -> samples
  nfe: int


def load_models(chain) -> dict[str, Any]:
  """The EMA params of every finished stage of the chain (the teacher as imported, if so)."""
  models = {}
  for stage in ("teacher", "trajectory", "distribution"):
    try:
      models[stage] = chain.load_export(stage)
    except FileNotFoundError:
      print(f"[eval] no finished {stage} stage in {chain.workdir}: its rows are left out",
            flush=True)
  return models


def plan_rows(chain, stages) -> list[Row]:
  """The rows for the finished `stages`: the teacher at each of eval.teacher_steps, then stage 1
  and stage 2 at each of eval.student_steps."""
  cfg, rows = chain.config.eval, []
  if "teacher" in stages:
    rows += [Row(f"teacher ({steps_label(n)})", "teacher", teacher_sampler(chain, n),
                 teacher_nfe(chain, n)) for n in cfg.teacher_steps]
  for stage, label in STUDENT_LABELS:
    if stage in stages:
      rows += [Row(f"{label} ({steps_label(n)})", stage, student_sampler(chain, n), n)
               for n in cfg.student_steps]
  return rows


def measure_row(scorer, name: str, nfe: int, sample_fn, params, files_prefix=None):
  """(row, samples): {'model', 'nfe', metric columns..., 'sampling_s'} and what to draw."""
  t0 = time.time()
  metrics, samples = scorer.measure(sample_fn, params, files_prefix)
  return ({"model": name, "nfe": nfe, **metrics, "sampling_s": round(time.time() - t0, 2)},
          samples)


def run_eval(chain) -> dict:
  """Measures every finished model of a pipeline.Chain; skipped when metrics.json exists.

  The scorer (chain.source.make_scorer(chain), see the module docstring) is built only when
  there is work to do. Returns {'metrics_path', what metrics.json holds}.
  """
  out_dir = os.path.join(chain.workdir, "eval")
  metrics_path = os.path.join(out_dir, "metrics.json")
  if os.path.exists(metrics_path):
    print(f"[eval] finished earlier: {metrics_path}", flush=True)
    with open(metrics_path) as f:
      return {"metrics_path": metrics_path, **json.load(f)}
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  scorer = chain.source.make_scorer(chain)
  models = load_models(chain)
  grid_size = int(chain.config.sample.grid_size)

  rows = []
  for plan in plan_rows(chain, models):
    slug = plan.name.replace(" ", "_").replace("(", "").replace(")", "")
    prefix = os.path.join(out_dir, f"samples_{slug}")
    row, samples = measure_row(scorer, plan.name, plan.nfe, plan.sample_fn, models[plan.stage],
                               prefix)
    rows.append(row)
    if jax.process_index() == 0:
      scorer.save_grid(samples[:grid_size], prefix + ".png")
    chain.writer.write_scalars(0, {f"eval/{slug}/{k}": v for k, v in row.items()
                                   if isinstance(v, (int, float))})
    print(f"[eval] {format_row(row)}", flush=True)

  result = {**scorer.describe(), "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
  if jax.process_index() == 0:
    with open(metrics_path, "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "metrics.md"), "w") as f:
      f.write(markdown_table(rows) + "\n")
    print(markdown_table(rows), flush=True)
  return {"metrics_path": metrics_path, **result}


# -- formatting --------------------------------------------------------------------------------

def steps_label(n: int) -> str:
  return f"{n} step{'s' if n > 1 else ''}"


def format_row(row: dict) -> str:
  """A row on one console line: key=value, floats to 4 significant digits."""
  return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def markdown_table(rows: list[dict]) -> str:
  """The rows as a markdown table, columns in first-seen order."""
  cols = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(
        f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
  return "\n".join(lines)
