"""A first run that is quick and quiet, and defaults that start everywhere: TensorBoard events
without TensorFlow, a console of hierdistill's lines only with the chain's progress, the
embedded experiments' batch sizes on 1, 2, 4 and 8 devices, evaluation batches padded."""
import os
import re
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits, digits_text, toy2d
from hierdistill import config_checks
from hierdistill import sharding as shard_lib
from hierdistill.evaluation import embedded
from hierdistill.stages.progress import ChainProgress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(logdir: str) -> list:
  """Every Event of the event files under logdir, each record's CRCs checked (TensorBoard's
  record format), read without TensorFlow."""
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  events = []
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
      payload = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == (
          masked_crc32c(payload))
      events.append(event_pb2.Event.FromString(payload))
      pos += 16 + length
  return events


def test_event_writer_writes_what_tensorboard_reads_without_tensorflow(tmp_path):
  code = f"""
import sys
import numpy as np
from hierdistill import pipeline
w = pipeline._make_writer({str(tmp_path)!r})
w.write_scalars(7, {{"teacher/loss": 0.25}})
w.write_images(7, {{"teacher/samples": np.zeros((1, 8, 8, 1), np.uint8)}})
w.flush()
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  events = read_events(str(tmp_path / "tensorboard"))
  assert events[0].file_version == "brain.Event:2"
  values = {v.tag: (e.step, v) for e in events[1:] for v in e.summary.value}
  assert values["teacher/loss"][0] == 7 and values["teacher/loss"][1].simple_value == 0.25
  image = values["teacher/samples"][1].image
  assert (image.height, image.width) == (8, 8)
  assert image.encoded_image_string.startswith(b"\x89PNG")


def test_chain_progress_line():
  """Stage k of n, elapsed, and the chain's ETA: the running stage at its measured rate, later
  ones by their steps and relative step cost."""
  config = digits.get_config()  # teacher 2000, stage 1 1000, stage 2 400 (k = 2), eval
  p = ChainProgress(config, start_time=100.0)
  # At 10 teacher steps/s: the teacher's last 1000 steps 100 s; stage 1, 1000 steps of cost
  # 1.5: 150 s; stage 2, 400 steps of cost 2.5 x (1 + k) = 7.5: 300 s.
  assert p.remaining_s("teacher", 1000, 2000, 10.0) == pytest.approx(550.0)
  assert p.line("teacher", 1000, 2000, 10.0, now=225.0) == (
      "chain: stage 1 of 4, 2m05s elapsed, ETA ~9m10s")
  assert p.line("distribution", 200, 400, 2.0, now=400.0) == (
      "chain: stage 3 of 4, 5m00s elapsed, ETA 1m40s")  # the last training stage: measured
  assert p.line("teacher", 1, 2000, float("nan"), now=101.0).endswith("ETA ?")


def _allowed(line: str) -> bool:
  """hierdistill's console: [stage]/[data]/[eval] lines, the summary, blank lines."""
  return (not line.strip() or line.startswith("[") or line.startswith("hierdistill finished")
          or line.startswith("  "))


def test_first_run_console_shows_hierdistills_lines_only(tmp_path):
  """A launch that builds the data set, trains and writes events: not one line of TensorFlow,
  oneDNN, tfds or orbax on stdout or stderr; the stage line carries the chain's progress."""
  workdir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
  cmd = [sys.executable, os.path.join(ROOT, "launch", "main.py"),
         "--config=" + os.path.join(ROOT, "experiments", "digits.py") + ":tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'fresh_tfds'}",
         "--config.stages=('teacher',)", "--config.teacher.num_steps=2"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  foreign = [ln for ln in (out.stdout + out.stderr).splitlines() if not _allowed(ln)]
  assert not foreign, foreign
  assert "[data] building digits8x8" in out.stdout
  assert re.search(r"\[teacher\] step 2/2 .* \| ETA \S+ \| chain: stage 1 of 1, \S+ elapsed, "
                   r"ETA ", out.stdout), out.stdout
  events = read_events(str(workdir / "tensorboard"))
  tags = {v.tag for e in events for v in e.summary.value}
  assert {"teacher/loss", "teacher/samples"} <= tags


@pytest.mark.parametrize("experiment", [digits, digits_text, toy2d])
def test_defaults_start_on_1_2_4_and_8_devices(experiment):
  config = experiment.get_config()
  config_checks.validate_config(config)
  for n in (1, 2, 4, 8):
    config_checks.check_batch_sizes(config, n)
    assert shard_lib.make_mesh(config.mesh.data, config.mesh.fsdp,
                               devices=jax.devices()[:n]).devices.size == n


def test_eval_batches_are_padded_on_any_mesh():
  """eval.batch_size=5 on 8 devices: padded, trimmed, and the samples of 1 device exactly."""
  labels = np.arange(12, dtype=np.int32) % 10
  sample_fn = lambda params, noise, c: noise * params + c[:, None, None, None]
  key = jax.random.PRNGKey(0)
  one = embedded.generate(sample_fn, jnp.float32(2.0), labels, 5, (2, 2, 1), key,
                          shard_lib.make_mesh(-1, 1, devices=jax.devices()[:1]))
  eight = embedded.generate(sample_fn, jnp.float32(2.0), labels, 5, (2, 2, 1), key,
                            shard_lib.make_mesh(-1, 1, devices=jax.devices()))
  assert one.shape == (12, 2, 2, 1)
  np.testing.assert_array_equal(one, eight)
  first = 2.0 * jax.random.normal(jax.random.fold_in(key, 0), (5, 2, 2, 1))
  np.testing.assert_allclose(one[:5], first + labels[:5, None, None, None], rtol=1e-6)
