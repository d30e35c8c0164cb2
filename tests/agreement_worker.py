"""Helper of test_pod_agreement.py: one process of a two-process run of the real training loop
(stages/loop.run_stage) on a toy stage whose step compiles in a second.

  python tests/agreement_worker.py --process_id=I --port=N --workdir=DIR --num_steps=S \
      [--fail_restore_step=K] [--heartbeat_timeout_s=T]

The toy state is sharded over all 8 devices of the two processes (4 each), so both write parts
of every checkpoint and every step's reduction crosses the process boundary. Exits as
launch/main.py does: 0 done, 75 preempted (the message on stderr), 1 no checkpoint restores or
too many non-finite steps.
--fail_restore_step=K: on process 1 only, the checkpoint of step K does not restore (as if a
file only that process reads were damaged). --nan_from_step=K: process 1's rows of every batch
from step K on are NaN (the run allows 3 non-finite steps in a row).
"""
from __future__ import annotations

import argparse
import os
import sys

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
WIDTH = 8 * 1024  # params (WIDTH,): over 4096 elements, so the 'fsdp' rule shards them


def toy_stage():
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hierdistill import conditions as conditions_lib  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class State:
    params: dict
    ema_params: dict
    rng: jax.Array

  class ToyStage:
    """A step that depends on the state, the batch and the step's key, like a real one."""
    name = "toy"
    stage_id = 7
    conditions = conditions_lib.Labels(10)

    def init(self, rng, example_x, example_c, inputs):
      del example_x, example_c, inputs
      params = {"w": jax.random.normal(rng, (WIDTH,))}
      return State(params=params, ema_params=params, rng=rng)

    def train_step(self, state, frozen, batch):
      del frozen
      rng, key = jax.random.split(state.rng)
      w = state.params["w"]
      target = jnp.mean(batch["x"]) + 0.01 * jax.random.normal(key, w.shape)
      skipped = ~jnp.isfinite(jnp.mean(target))  # a non-finite step changes nothing
      params = {"w": jnp.where(skipped, w, 0.9 * w + 0.1 * target)}
      ema = {"w": 0.5 * state.ema_params["w"] + 0.5 * params["w"]}
      return State(params=params, ema_params=ema, rng=rng), {
          "loss": jnp.mean(params["w"] ** 2), "skipped": skipped.astype(jnp.int32)}

    def sample(self, params, noise, c):
      del c
      return noise + jnp.mean(params["w"])

  return ToyStage()


class Pipeline:
  """Batches as a function of the step: this process's rows of the global batch."""

  def __init__(self, global_batch: int, process_index: int, nan_from_step: int = -1):
    import numpy as np  # pylint: disable=g-import-not-at-top
    self.images = np.zeros((global_batch, 4, 4, 1), np.float32)
    self._rows = global_batch // NUM_PROCESSES
    self._index = process_index
    self._nan_from = nan_from_step

  def batch(self, step: int) -> dict:
    import numpy as np  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng([step, self._index])
    x = rng.normal(size=(self._rows, 4, 4, 1)).astype(np.float32)
    if 0 <= self._nan_from <= step:
      x[:] = np.nan
    return {"x": x, "c": rng.integers(0, 10, size=(self._rows,)).astype(np.int32)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_steps", type=int, required=True)
  parser.add_argument("--fail_restore_step", type=int, default=-1)
  parser.add_argument("--heartbeat_timeout_s", type=int, default=100)
  parser.add_argument("--check_interval_s", type=float, default=0.05)
  parser.add_argument("--nan_from_step", type=int, default=-1)
  args = parser.parse_args(argv)
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  from hierdistill import agreement  # pylint: disable=g-import-not-at-top
  from hierdistill import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from hierdistill import event_writer, sharding  # pylint: disable=g-import-not-at-top
  from hierdistill.evaluation import grids  # pylint: disable=g-import-not-at-top
  from hierdistill.stages import loop  # pylint: disable=g-import-not-at-top

  sharding.initialize_distributed(f"127.0.0.1:{args.port}", NUM_PROCESSES, args.process_id,
                                  cpu_collectives="gloo",
                                  heartbeat_timeout_s=args.heartbeat_timeout_s,
                                  shutdown_timeout_s=args.heartbeat_timeout_s)
  # Checks every few steps (the defaults would check only a handful of times here).
  agreement.STOP_CHECK_INTERVAL_S = args.check_interval_s
  agreement.CHECK_SPACING = 0
  if args.fail_restore_step >= 0 and jax.process_index() == 1:
    restore = ckpt_lib.StageCheckpoints.restore

    def failing_restore(self, step, abstract_state):
      if step == args.fail_restore_step:
        raise OSError(f"a damaged file of step {step}, read by process 1 only")
      return restore(self, step, abstract_state)

    ckpt_lib.StageCheckpoints.restore = failing_restore

  config = ConfigDict({
      "seed": 0, "sharding_rules": sharding.DEFAULT_RULES, "max_consecutive_nonfinite": 3,
      "toy": {"num_steps": args.num_steps, "batch_size": 16, "log_every": 25,
              "checkpoint_every": 40, "keep": 3}})
  mesh = sharding.make_mesh(1, NUM_PROCESSES * LOCAL_DEVICES)
  stage = toy_stage()
  noise = np.zeros((2, 4, 4, 1), np.float32)
  try:
    result = loop.run_stage(
        stage, config=config, workdir=args.workdir, mesh=mesh,
        pipeline=Pipeline(16, jax.process_index(),
                          args.nan_from_step if jax.process_index() == 1 else -1), frozen={},
        init_inputs=lambda abstract=False: {}, grid=(noise, np.zeros((2,), np.int32)),
        writer=event_writer.NullWriter(), save_grid=grids.save_image_grid)
  except loop.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
  except (ckpt_lib.CheckpointError, loop.NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"done: {result.steps_run} steps", flush=True)


if __name__ == "__main__":
  main()
