"""Two processes stop, save and resume as one (docs/reliability.md, "Several processes").

Real processes on this machine: jax.distributed over loopback, gloo CPU collectives, 4 CPU
devices each, the state sharded across both. The fast test runs the training loop on a toy
stage (agreement_worker.py); the slow ones run launch/main.py on the tiny digits stages 1 and 2.
HIERDISTILL_TEST_SEED=N replays the signal points of a failed run.
"""
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
from etils import epath
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import digits
from hierdistill import checkpoint as ckpt_lib
from hierdistill import pipeline
from hierdistill.sources.embedded import load_train_set
from hierdistill.stages import loop
from test_multiprocess import _env, _free_port, _gloo_available

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEED = int(os.environ.get("HIERDISTILL_TEST_SEED", time.time_ns() % 100_000))
# Both processes of a launch must end within this (a hang on a collective would not).
TIMEOUT_S = 900


class Pair:
  """Two processes of one run started side by side, their output in files."""

  def __init__(self, commands, env, out_prefix):
    self.out = [f"{out_prefix}.{i}" for i in range(2)]
    self.procs = []
    for i, (cmd, out) in enumerate(zip(commands, self.out)):
      with open(out + ".out", "w") as o, open(out + ".err", "w") as e:
        self.procs.append(subprocess.Popen(cmd, stdout=o, stderr=e, env=env[i], cwd=ROOT))

  def wait(self, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    try:
      self.rc = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      for p in self.procs:
        p.kill()
      pytest.fail(f"the two processes did not end within {timeout} s: {self.describe()}")
    return self.rc

  def text(self, i, kind="err"):
    with open(f"{self.out[i]}.{kind}") as f:
      return f.read()

  def describe(self):
    def err(i):  # the first Python error (what ended the process), then the end of stderr
      text = self.text(i)
      first = text.find("Traceback")
      return (text[first:first + 3000] + "\n...\n" if first >= 0 else "") + text[-2000:]
    return "\n".join(f"process {i}: rc={p.poll()}\n{self.text(i, 'out')[-2000:]}\n{err(i)}"
                     for i, p in enumerate(self.procs))

  def wait_for(self, predicate, what, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if predicate():
        return
      if any(p.poll() is not None for p in self.procs):
        pytest.fail(f"a process ended before {what}: {self.describe()}")
      time.sleep(0.01)
    pytest.fail(f"not {what} within {timeout} s")


def stopped_step(pair, i) -> int:
  found = re.search(r"stopped by SIGTERM \(sent to process (\d) of 2\) after step (\d+);",
                    pair.text(i))
  assert found, pair.describe()
  return int(found.group(2))


def assert_nothing_half_written_is_listed(workdir, stage):
  """A save cut short is only a *.orbax-checkpoint-tmp directory, which no resume takes; every
  step a resume may take reads back whole."""
  ckpts = os.path.join(workdir, stage, "checkpoints")
  for name in os.listdir(ckpts):
    assert name.isdigit() or name.endswith(".orbax-checkpoint-tmp"), name
  for step in ckpt_lib.saved_steps(workdir, stage):
    read_back(os.path.join(ckpts, str(step), "state"))


def read_back(path):
  """The arrays of a checkpoint item written by the two processes, here on one device."""
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def assert_same_checkpoint(workdir, reference, stage, step):
  """State and export of `stage` at `step` are bitwise those of the reference run."""
  for item in ("state", "export"):
    got, want = (read_back(os.path.join(w, stage, "checkpoints", str(step), item))
                 for w in (workdir, reference))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                    err_msg=f"{stage}/{item}{jax.tree_util.keystr(path)} "
                                            f"(HIERDISTILL_TEST_SEED={SEED})")


# -- fast: the training loop on a toy stage -----------------------------------------------------
def toy_pair(workdir, num_steps, name, **flags):
  port = _free_port()
  commands = [[sys.executable, os.path.join(HERE, "agreement_worker.py"), f"--process_id={i}",
               f"--port={port}", f"--workdir={workdir}", f"--num_steps={num_steps}"]
              + [f"--{k}={v}" for k, v in flags.items()] for i in range(2)]
  return Pair(commands, [_env(4)] * 2, f"{workdir}.{name}")


def test_one_signalled_process_stops_both_at_one_saved_step_and_resume_agrees(tmp_path):
  """SIGTERM to one of two processes at a random moment: both save the same step and exit 75.
  On the rerun, the newest checkpoint fails to restore on process 1 only: both resume from the
  same older one (the failed one is moved aside), and the run ends bitwise where an
  uninterrupted run ends."""
  reason = _gloo_available()
  if reason:
    pytest.skip(f"no multi-process CPU collectives: {reason}")
  rng = random.Random(SEED)
  workdir = str(tmp_path / "run")
  run = toy_pair(workdir, 100_000, "term")
  run.wait_for(lambda: ckpt_lib.saved_steps(workdir, "toy"), "the first checkpoint")
  time.sleep(rng.uniform(0.0, 0.5))
  victim = rng.randint(0, 1)
  run.procs[victim].send_signal(signal.SIGTERM)
  assert run.wait() == [loop.PREEMPTED_EXIT_CODE] * 2, run.describe()
  step = stopped_step(run, 0)
  assert stopped_step(run, 1) == step
  assert f"(sent to process {victim} of 2)" in run.text(0)
  saved = ckpt_lib.saved_steps(workdir, "toy")
  assert saved[-1] == step, (saved, step)
  assert_nothing_half_written_is_listed(workdir, "toy")

  final = step + 60  # a checkpoint every 40 steps: at least one more on the way
  older = saved[-2]
  rerun = toy_pair(workdir, final, "rerun", fail_restore_step=step)
  reference = toy_pair(str(tmp_path / "reference"), final, "run")
  assert rerun.wait() == [0, 0], rerun.describe()
  assert reference.wait() == [0, 0], reference.describe()
  for i in range(2):
    assert f"[toy] resumed from its checkpoint at step {older}" in rerun.text(i, "out")
  assert os.path.isdir(os.path.join(workdir, "toy", "corrupt_checkpoints", str(step)))
  assert_same_checkpoint(workdir, str(tmp_path / "reference"), "toy", final)


def test_nonfinite_rows_on_one_process_stop_both_at_one_step(tmp_path):
  """NaN rows in process 1's share of the batch from step 30: the step is non-finite for both
  (one global loss), both skip it, and both stop with NonFiniteError at the same step (the
  checkpoint at 40, the first read of the counters after the streak reached 3)."""
  reason = _gloo_available()
  if reason:
    pytest.skip(f"no multi-process CPU collectives: {reason}")
  workdir = str(tmp_path / "run")
  run = toy_pair(workdir, 200, "nan", nan_from_step=29)  # the batch of step 30
  assert run.wait() == [1, 1], run.describe()
  for i in range(2):
    assert re.search(r"toy: \d+ steps in a row had a non-finite loss or gradient "
                     r"\(config\.max_consecutive_nonfinite=3; seen at step 40, 11 skipped in all\)",
                     run.text(i)), run.describe()
  assert ckpt_lib.saved_steps(workdir, "toy") == []  # step 40 stopped before its save


# -- slow: launch/main.py on the tiny digits stages ---------------------------------------------
STEPS = 32  # a stage's steps; the signal lands in the first quarter, the agreed stop follows
HEARTBEAT_S = 20  # --heartbeat_timeout_s of the launches: the documented bound, shortened


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(data_dir, teacher export) shared by the launches of this module."""
  reason = _gloo_available()
  if reason:
    pytest.skip(f"no multi-process CPU collectives: {reason}")
  base = tmp_path_factory.mktemp("pod")
  config = digits.get_config("tiny")
  config.data.data_dir = str(base / "tfds")
  load_train_set(config.data)  # built once here: two processes would race to write it
  config.stages = ("teacher",)
  config.mesh.update(data=1, fsdp=1)
  teacher = str(base / "teacher")
  pipeline.run(config, teacher, devices=jax.devices()[:1])
  export = ckpt_lib.export_dir(teacher, "teacher", int(config.teacher.num_steps))
  return config.data.data_dir, export


def launch_pair(setup, workdir, stage, name):
  data_dir, export = setup
  port = _free_port()
  args = [sys.executable, "launch/main.py", "--config=experiments/digits.py:tiny",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.stages=('{stage}',)", f"--config.teacher.init_checkpoint={export}",
          "--config.mesh.data=2", "--config.mesh.fsdp=4", f"--heartbeat_timeout_s={HEARTBEAT_S}",
          f"--shutdown_timeout_s={HEARTBEAT_S}", f"--config.{stage}.num_steps={STEPS}",
          f"--config.{stage}.checkpoint_every=5", f"--config.{stage}.keep=3",
          f"--config.{stage}.log_every=1"]
  if stage == "distribution":
    args.append("--config.distribution.init_from=teacher")
  envs = []
  for i in range(2):
    env = _env(4)
    # No persistent compilation cache: with one, a process that loads a step while the other
    # compiles it reaches the first collective far ahead, and gloo gives up on setting up a
    # communicator after 30 s.
    # Checks at least every 0.2 s (200 check durations if longer), so that the stop comes
    # before the stage's end however fast the steps are.
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), HIERDISTILL_STOP_CHECK_INTERVAL_S="0.2")
    envs.append(env)
  return Pair([args, args], envs, f"{workdir}.{name}")


def signal_at_random_step(setup, workdir, stage, sig, rng, name):
  """Launches the pair and sends `sig` to one of its processes at a random step of the first
  quarter; returns (pair, the process signalled)."""
  pair = launch_pair(setup, workdir, stage, name)
  target = rng.randint(2, STEPS // 4)
  pair.wait_for(lambda: f"[{stage}] step {target}/" in pair.text(0, "out"), f"step {target}")
  time.sleep(rng.uniform(0.0, 0.1))
  victim = rng.randint(0, 1)
  pair.procs[victim].send_signal(sig)
  return pair, victim


@pytest.fixture(scope="module")
def references(setup, tmp_path_factory):
  """{stage: the workdir of an uninterrupted two-process run of it}, each run when first asked."""
  base = tmp_path_factory.mktemp("reference")
  class Runs(dict):
    def __missing__(self, stage):
      pair = launch_pair(setup, str(base / stage), stage, "run")
      assert pair.wait() == [0, 0], pair.describe()
      self[stage] = str(base / stage)
      return self[stage]

  return Runs()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["trajectory", "distribution"])
def test_sigterm_to_one_process_both_save_one_step_and_resume_bitwise(stage, setup, references,
                                                                      tmp_path):
  rng = random.Random(SEED + (stage == "distribution"))
  workdir = str(tmp_path / "run")
  pair, victim = signal_at_random_step(setup, workdir, stage, signal.SIGTERM, rng, "term")
  assert pair.wait() == [loop.PREEMPTED_EXIT_CODE] * 2, pair.describe()
  step = stopped_step(pair, 0)
  assert stopped_step(pair, 1) == step < STEPS
  assert f"(sent to process {victim} of 2)" in pair.text(1)
  assert ckpt_lib.saved_steps(workdir, stage)[-1] == step
  rerun = launch_pair(setup, workdir, stage, "rerun")
  assert rerun.wait() == [0, 0], rerun.describe()
  for i in range(2):
    assert f"[{stage}] resumed from its checkpoint at step {step}" in rerun.text(i, "out")
  assert_same_checkpoint(workdir, references[stage], stage, STEPS)


@pytest.mark.slow
def test_sigkill_of_one_process_ends_the_other_and_the_rerun_resumes_bitwise(setup, references,
                                                                             tmp_path):
  rng = random.Random(SEED + 2)
  workdir = str(tmp_path / "run")
  pair, victim = signal_at_random_step(setup, workdir, "trajectory", signal.SIGKILL, rng, "kill")
  killed_at = time.monotonic()
  survivor = pair.procs[1 - victim]
  rc = survivor.wait(timeout=HEARTBEAT_S + 60)
  waited = time.monotonic() - killed_at
  pair.wait()
  assert pair.rc[victim] == -signal.SIGKILL
  assert rc != 0, pair.describe()
  assert waited < HEARTBEAT_S + 30, waited  # the heartbeat timeout, plus the abort's own time
  assert_nothing_half_written_is_listed(workdir, "trajectory")
  saved = ckpt_lib.saved_steps(workdir, "trajectory")
  rerun = launch_pair(setup, workdir, "trajectory", "rerun")
  assert rerun.wait() == [0, 0], rerun.describe()
  if saved:
    for i in range(2):
      assert (f"[trajectory] resumed from its checkpoint at step {saved[-1]}"
              in rerun.text(i, "out"))
  assert_same_checkpoint(workdir, references["trajectory"], "trajectory", STEPS)
