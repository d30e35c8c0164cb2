"""Helper of test_multiprocess.py: a few train steps of every stage, the losses out as JSON.

As a process of a multi-process run (jax.distributed over loopback, gloo CPU collectives):

  python tests/multiprocess_worker.py --process_id=I --num_processes=P --port=N \
      --local_devices=D --out=FILE

Imported, `stage_losses()` runs the same computation in the calling process over its devices:
the single-process reference. Both feed the same global batches, each process its own rows
(InMemoryPipeline's slice), so their losses must agree.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

STAGES = ("teacher", "trajectory", "distribution")
# The per-step scalars compared between runs: one loss of each network a step trains.
COMPARED = ("loss", "grad_norm", "critic_loss", "meanflow_mse", "dmd_loss", "disc_loss")


def synthetic_digits(n: int = 256, seed: int = 0):
  """Images and labels shaped like the embedded digits, with no tfds build (which several
  processes would race to write into one data dir)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  x = np.clip(rng.normal(size=(n, 8, 8, 1)), -1, 1).astype(np.float32)
  y = rng.integers(0, 10, size=(n,)).astype(np.int32)
  return x, y


def tiny_config(data: int, fsdp: int):
  from experiments import digits  # pylint: disable=g-import-not-at-top
  c = digits.get_config("tiny")
  c.mesh.update(data=data, fsdp=fsdp)
  for stage in (c.teacher, c.trajectory, c.distribution):
    # Full-rate steps from the first, and EMA = the trained params: after three steps the
    # handoffs then carry weights that moved (a zero-output teacher would hand stage 1 a
    # problem it already solves, with losses near 1e-23 that compare nothing).
    stage.optimizer.warmup_steps = 0
    stage.ema_decay = 0.0
  return c


def _init(stage, example_x, example_y, rng, inputs):
  return stage.init(rng, example_x, example_y, inputs)


def stage_losses(num_steps: int = 3, mesh_shape=(4, 2), stages=STAGES) -> dict:
  """{stage: {metric: [value at each step]}} of `num_steps` steps of each stage in turn.

  stages: a prefix of STAGES (each stage starts from the ones before it).

  Each stage starts as the chain would: stage 1 from the teacher's EMA params, stage 2 from
  stage 1's (generator) and the teacher's (fake network); only the handoff is in memory here.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hierdistill import data as data_lib  # pylint: disable=g-import-not-at-top
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top

  config = tiny_config(*mesh_shape)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  x, y = synthetic_digits()
  nets = pipeline.Networks(config)
  exported = {}
  out = {}
  for name in stages:
    stage = pipeline.build_stage(name, config, nets)
    cfg = getattr(config, name)
    rows = getattr(stage, "examples_per_row", 1)
    data = data_lib.InMemoryPipeline(
        x, y, global_batch_size=cfg.batch_size * rows, seed=stage.stage_id,
        process_index=jax.process_index(), process_count=jax.process_count())
    frozen = {} if name == "teacher" else {"teacher": exported["teacher"]}
    inputs = {"trajectory": {"teacher": exported.get("teacher")},
              "distribution": {"generator": exported.get("trajectory"),
                               "teacher": exported.get("teacher")}}.get(name, {})
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), stage.stage_id)
    ex_x, ex_y = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    init_fn = functools.partial(_init, stage, ex_x, ex_y)
    shardings = sharding.state_shardings(jax.eval_shape(init_fn, rng, inputs), mesh,
                                         config.sharding_rules)
    state = jax.jit(init_fn, out_shardings=shardings)(rng, inputs)
    # Traced under the mesh, as stages/loop.py does: the models' batch pins see it.
    step_fn = sharding.under_mesh(jax.jit(
        stage.train_step,
        in_shardings=(shardings, jax.tree.map(lambda a: a.sharding, frozen),
                      sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,)), mesh)
    history = {}
    for step in range(num_steps):
      local = data.batch(step)
      if rows > 1:  # (B * rows, ...) -> (B, rows, ...), as the training loop lays it out
        local = jax.tree.map(lambda a: a.reshape((a.shape[0] // rows, rows) + a.shape[1:]),
                             local)
      state, metrics = step_fn(state, frozen, sharding.put_batch(local, mesh))
      metrics = jax.device_get(metrics)
      for k in COMPARED:
        if k in metrics:
          history.setdefault(k, []).append(float(metrics[k]))
    exported[name] = state.ema_params
    out[name] = history
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--local_devices", type=int, default=4)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  # The device count is read once, when the backend starts: set it before jax is imported.
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  # Loopback only: every process of the test runs on this machine.
  sharding.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes,
                                  args.process_id, cpu_collectives="gloo")
  assert jax.process_count() == args.num_processes, jax.process_count()
  result = {"process_id": jax.process_index(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "losses": stage_losses(args.steps, stages=tuple(args.stages.split(",")))}
  with open(args.out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
