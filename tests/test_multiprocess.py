"""Two local processes of 4 CPU devices each (jax.distributed, gloo collectives over loopback)
train every stage to the same losses as one process of 8 devices on the same global batches.

Each process feeds only its own rows of the global batch (InMemoryPipeline's slice, made global
by sharding.put_batch); the parameters and optimiser states are sharded over 'fsdp' across the
process boundary, so the step's collectives cross it too.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from hierdistill.sources.embedded import load_train_set

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "multiprocess_worker.py")
STAGES = ("teacher", "trajectory", "distribution")
# For the three processes together. Each compiles its stages' steps (at -O0: about 10 s for
# the teacher's, 15 s for stage 1's, 50 s for stage 2's on an idle core; several times that when
# the 2 cores are shared); past this the run is stuck, most likely on a collective.
TIMEOUT_S = 1200
# One program on one layout either way; only the summation order of the cross-process
# all-reduces may differ.
RTOL, ATOL = 1e-4, 1e-7


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _gloo_available() -> str:
  """'' when this jax can run CPU collectives over gloo, else the reason it cannot."""
  import jax  # pylint: disable=g-import-not-at-top
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    return f"jax {jax.__version__} has no jax_cpu_collectives_implementation option"
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "jaxlib exposes no _jax extension to look for gloo in"
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib was built without gloo CPU collectives"
  return ""


def _env(local_devices: int) -> dict:
  env = dict(os.environ)
  # Compile at LLVM -O0: the stages' programs compile several times faster, and the run is
  # a few tiny steps whose speed does not matter. The same setting on both sides of the
  # comparison, so the same arithmetic.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={local_devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(tmp, stages):
  """(reference, [process 0's, process 1's]) results of `stages`, three processes at once."""
  reason = _gloo_available()
  if reason:
    pytest.skip(f"no multi-process CPU collectives: {reason}")
  port = _free_port()
  procs = []
  outs = []
  # The reference: one process, 8 devices, no jax.distributed; started with the two others
  # so the three compile side by side.
  ref_out = str(tmp / "reference.json")
  ref_code = ("import json, sys; sys.path.insert(0, %r); import jax; "
              "jax.config.update('jax_threefry_partitionable', True); "
              "import multiprocess_worker as w; "
              "json.dump({'devices': jax.device_count(), "
              "'losses': w.stage_losses(3, stages=%r)}, open(%r, 'w'))" % (HERE, stages, ref_out))
  procs.append(subprocess.Popen([sys.executable, "-c", ref_code], env=_env(8), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  for i in range(2):
    out = str(tmp / f"process{i}.json")
    outs.append(out)
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, f"--process_id={i}", "--num_processes=2", f"--port={port}",
         "--local_devices=4", "--steps=3", f"--stages={','.join(stages)}", f"--out={out}"],
        env=_env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = []
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"the processes did not finish in {TIMEOUT_S} s (a collective that never "
                "completes hangs both workers)")
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  with open(ref_out) as f:
    reference = json.load(f)
  results = []
  for out in outs:
    with open(out) as f:
      results.append(json.load(f))
  return reference, results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Teacher and stage 1 (the JVP step): the default, a few minutes on 2 busy cores."""
  return _run(tmp_path_factory.mktemp("multiprocess"), ("teacher", "trajectory"))


@pytest.fixture(scope="module")
def runs_all(tmp_path_factory):
  """Every stage, stage 2 included (its step alone compiles for about a minute a process)."""
  return _run(tmp_path_factory.mktemp("multiprocess_all"), STAGES)


def _check_losses(runs, stage):
  reference, results = runs
  expected = reference["losses"][stage]
  assert expected["loss"] and all(np.isfinite(expected["loss"]))
  # A loss that moves shows the handoffs carried trained weights, so the comparison bites.
  assert max(expected["loss"]) > 1e-6, expected["loss"]
  for r in results:
    got = r["losses"][stage]
    assert sorted(got) == sorted(expected)
    for metric, values in expected.items():
      np.testing.assert_allclose(got[metric], values, rtol=RTOL, atol=ATOL,
                                 err_msg=f"{stage}/{metric}, process {r['process_id']}")


def test_each_process_sees_the_whole_mesh(runs):
  reference, results = runs
  assert reference["devices"] == 8
  assert sorted(r["process_id"] for r in results) == [0, 1]
  for r in results:
    assert r["devices"] == 8 and r["local_devices"] == 4


@pytest.mark.parametrize("stage", ["teacher", "trajectory"])
def test_losses_equal_the_single_process_run(runs, stage):
  _check_losses(runs, stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_losses_equal_the_single_process_run(runs_all, stage):
  _check_losses(runs_all, stage)


@pytest.mark.slow
def test_launch_starts_two_processes_from_the_environment(tmp_path):
  """launch/main.py, as a user starts it on a machine jax does not know as a cluster: the
  coordinator, process count and index in the environment, gloo chosen for CPU by
  sharding.maybe_initialize_distributed. Both processes train the teacher on one (2, 4) mesh."""
  reason = _gloo_available()
  if reason:
    pytest.skip(f"no multi-process CPU collectives: {reason}")
  from experiments import digits  # pylint: disable=g-import-not-at-top
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "tfds")
  config = digits.get_config("tiny")
  config.data.data_dir = data_dir
  load_train_set(config.data)  # built once here: two processes would race to write it
  port = _free_port()
  workdir = str(tmp_path / "run")
  procs = []
  for pid in range(2):
    env = _env(4)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, "launch/main.py", "--config=experiments/digits.py:tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         "--config.stages=('teacher',)", "--config.mesh.data=2", "--config.mesh.fsdp=4"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["stages"]["teacher"]["steps_run"] == 4
  assert "[teacher] step 4/4" in outs[0]
