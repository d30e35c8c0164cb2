"""What the processes' agreement on when to stop costs a training step (agreement.StopAgreement).

  python benchmarks/stop_agreement.py [--stage=teacher --rounds=5 --steps=60 --processes=2
                                       --local_devices=4]

Starts --processes local processes (jax.distributed over loopback, gloo CPU collectives) of
--local_devices CPU devices each, and runs the digits experiment's step of --stage (default
config: batch 64, the 0.3M-parameter DiT, the mesh over all devices) as the training loop does:
batch, put on the mesh, dispatch, and after each step ask the agreement. Rounds alternate three
ways of asking, --steps steps each, each ended by block_until_ready:
  none        no agreement (the step alone)
  default     StopAgreement as the loop makes it (a check every STOP_CHECK_INTERVAL_S, or
              CHECK_SPACING times a check's duration if longer)
  every step  StopAgreement checking after every step: the worst case
and print, from process 0: ms per step of each (median over rounds), the ratio to `none`, the
time one check takes (median over every check made), and the share of the wall time checks
take in a long run (check time / spacing of the checks). On a busy machine the differences
between the three rows are within the rounds' spread; the check's own time is the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker(args) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import digits  # pylint: disable=g-import-not-at-top
  from hierdistill import agreement  # pylint: disable=g-import-not-at-top
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top
  from hierdistill.data import InMemoryPipeline  # pylint: disable=g-import-not-at-top
  from hierdistill.stages import loop  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  sharding.initialize_distributed(f"127.0.0.1:{args.port}", args.processes, args.process_id,
                                  cpu_collectives="gloo")
  config = digits.get_config()
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  nets = pipeline.Networks(config)
  stage = pipeline.build_stage(args.stage, config, nets)
  cfg = getattr(config, args.stage)
  rows = getattr(stage, "examples_per_row", 1)
  rng = np.random.default_rng(0)  # digits-shaped data; the step's cost does not depend on it
  x = np.clip(rng.normal(size=(1024, 8, 8, 1)), -1, 1).astype(np.float32)
  y = rng.integers(0, 10, size=(1024,)).astype(np.int32)
  data = InMemoryPipeline(x, y, global_batch_size=cfg.batch_size * rows, seed=0,
                          process_index=jax.process_index(), process_count=jax.process_count())
  key = jax.random.PRNGKey(0)
  teacher_abstract = nets.abstract_params((8, 8, 1), student=False)
  inputs = {} if args.stage == "teacher" else {
      "teacher": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), teacher_abstract)}
  frozen = {} if args.stage == "teacher" else {"teacher": inputs["teacher"]}
  ex_x = np.zeros((1, 8, 8, 1), np.float32)
  ex_c = nets.conditions.example(1)
  init_fn = lambda r, i: stage.init(r, ex_x, ex_c, i)  # noqa: E731
  shardings = sharding.state_shardings(jax.eval_shape(init_fn, key, inputs), mesh,
                                       config.sharding_rules)
  state = jax.jit(init_fn, out_shardings=shardings)(key, inputs)
  health = {k: np.int32(0) for k in ("skipped", "streak", "longest")}
  health_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), health)
  frozen = jax.device_put(frozen, sharding.replicated(mesh))
  step_fn = sharding.under_mesh(jax.jit(
      loop._count_skips(stage.train_step),  # pylint: disable=protected-access
      in_shardings=((shardings, health_shardings),
                    jax.tree.map(lambda _: sharding.replicated(mesh), frozen),
                    sharding.batch_sharding(mesh)),
      out_shardings=((shardings, health_shardings), sharding.replicated(mesh)),
      donate_argnums=(0,)), mesh)
  carry = (state, jax.device_put(health, health_shardings))

  def batch(step):
    local = data.batch(step)
    if rows > 1:
      local = jax.tree.map(lambda a: a.reshape((a.shape[0] // rows, rows) + a.shape[1:]), local)
    return sharding.put_batch(local, mesh)

  check_times = []

  def timed(agree):
    def ask(step):
      t = time.perf_counter()
      checks = agree._next  # pylint: disable=protected-access
      agree(step, None)
      if step >= checks:  # a check was made: its exchange is what costs
        check_times.append(time.perf_counter() - t)
    return ask

  step = 0
  carry, metrics = step_fn(carry, frozen, batch(step))  # compile
  jax.block_until_ready(metrics)
  results = {"none": [], "default": [], "every step": []}
  default_spacing = agreement.CHECK_SPACING
  for r in range(args.rounds):
    for way in results:
      agreement.CHECK_SPACING = 0 if way == "every step" else default_spacing
      agree = None if way == "none" else agreement.StopAgreement(
          f"{way}-{r}", step, interval_s=0.0 if way == "every step" else None)
      ask = timed(agree) if agree else None
      t0 = time.perf_counter()
      for _ in range(args.steps):
        carry, metrics = step_fn(carry, frozen, batch(step))
        step += 1
        if ask:
          ask(step)
      jax.block_until_ready(metrics)
      results[way].append((time.perf_counter() - t0) / args.steps)
  if jax.process_index() == 0:
    # The default's checks are few; the every-step rounds give the time of one check.
    print(json.dumps({"step_s": results, "check_s": check_times,
                      "interval_s": agreement.STOP_CHECK_INTERVAL_S,
                      "check_spacing": default_spacing}), flush=True)
  jax.distributed.shutdown()


def _median(values):
  values = sorted(values)
  n = len(values)
  return (values[n // 2] + values[(n - 1) // 2]) / 2


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stage", default="teacher",
                      choices=("teacher", "trajectory", "distribution"))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--local_devices", type=int, default=4)
  parser.add_argument("--process_id", type=int, default=-1, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.process_id >= 0:
    _worker(args)
    return
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f"--process_id={i}", f"--port={port}"]
      + [f"--{k}={getattr(args, k)}" for k in ("stage", "rounds", "steps", "processes",
                                                 "local_devices")],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
      for i in range(args.processes)]
  outs = [p.communicate()[0] for p in procs]
  if any(p.returncode for p in procs):
    sys.exit(f"a process failed: {[p.returncode for p in procs]}")
  line = next(ln for ln in outs[0].splitlines() if ln.startswith("{"))
  r = json.loads(line)
  none = _median(r["step_s"]["none"])
  print(f"digits {args.stage} step, {args.processes} processes x {args.local_devices} CPU "
        f"devices, {args.rounds} rounds of {args.steps} steps each way")
  for way, times in r["step_s"].items():
    t = _median(times)
    spread = (max(times) - min(times)) / t
    print(f"  {way:<11} {t * 1e3:8.2f} ms/step  ratio {t / none:.4f}  "
          f"(spread over rounds {spread:.1%})")
  check = _median(r["check_s"])
  spacing = max(r["interval_s"], r["check_spacing"] * check)
  print(f"  one check: {check * 1e3:.2f} ms (median of {len(r['check_s'])})")
  print(f"  default: checks {spacing:.2f} s apart in a long run (at most "
        f"{max(spacing / none, 1):.1f} steps after a signal), costing {check / spacing:.3%} "
        f"of the wall time; checking every step: {check / none:.2%} of a step")


if __name__ == "__main__":
  main()
