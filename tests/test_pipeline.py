"""The whole chain on a tiny config: every stage on 1 device and on a (4, 2) mesh of 8 fake CPU
devices, the handoff between stages, rerunning a finished chain, and resuming a stage; each
with both kinds of condition (class labels: digits, text: digits_text)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits, digits_text
from hierdistill import conditions as cond_lib
from hierdistill import pipeline
from hierdistill.stages.distribution import DistributionStage
from hierdistill.stages.trajectory import TrajectoryStage

STAGES = ("teacher", "trajectory", "distribution")


class RecordingWriter:
  """A clu-style metric writer that keeps every scalar, to compare runs."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self.scalars[(k, int(step))] = float(v)

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass


EXPERIMENTS = {"digits": digits, "digits_text": digits_text}


def tiny_config(data_dir, experiment="digits", **mesh):
  c = EXPERIMENTS[experiment].get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(mesh)
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module", params=tuple(EXPERIMENTS))
def experiment(request):
  return request.param


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, data_dir, experiment):
  workdir = str(tmp_path_factory.mktemp(f"one_device_{experiment}"))
  writer = RecordingWriter()
  config = tiny_config(data_dir, experiment, data=1, fsdp=1)
  summary = pipeline.run(config, workdir, devices=jax.devices()[:1], writer=writer)
  return workdir, config, writer, summary


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory, data_dir, experiment, one_device_run):
  """Each stage alone on the (4, 2) mesh, from the same upstream exports as the 1-device run."""
  ref_workdir = one_device_run[0]
  writer = RecordingWriter()
  for i, stage in enumerate(STAGES):
    workdir = str(tmp_path_factory.mktemp(f"mesh_4x2_{experiment}_{stage}"))
    for upstream in STAGES[:i]:
      shutil.copytree(os.path.join(ref_workdir, upstream), os.path.join(workdir, upstream))
    config = tiny_config(data_dir, experiment, data=4, fsdp=2)
    config.stages = (stage,)
    pipeline.run(config, workdir, writer=writer)
  return writer


def test_every_stage_trains_and_leaves_samples(one_device_run):
  workdir, config, writer, summary = one_device_run
  for stage in STAGES:
    s = summary["stages"][stage]
    assert s["status"] == "trained" and s["steps_run"] == getattr(config, stage).num_steps
    assert os.path.getsize(s["samples"]) > 0
    assert np.isfinite(s["final_metrics"]["loss"]), stage
  assert os.path.exists(os.path.join(workdir, "summary.json"))


def test_eval_writes_metrics_for_every_model(one_device_run):
  workdir, config, _, _ = one_device_run
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  names = [r["model"] for r in metrics["rows"]]
  assert len(names) == len(config.eval.teacher_steps) + 2 * len(config.eval.student_steps)
  for row in metrics["rows"]:
    assert np.isfinite(row["FD-digits"]) and row["FD-digits"] >= 0
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert 0 <= row["class_accuracy"] <= 1
  assert metrics["feature_net"] == "FD-digits"
  assert metrics["num_samples"] == config.eval.num_samples


def test_mesh_run_matches_one_device(one_device_run, mesh_run):
  """The (4, 2) mesh computes the same losses as 1 device, within float tolerance.

  Compared at each stage's first step, from identical inputs: later steps are not comparable
  on these barely trained tiny networks, whose gradients are near zero, where Adam turns
  rounding-level differences of reduction order into full-size updates.
  """
  _, _, one, _ = one_device_run
  sharded = mesh_run
  keys = [k for k in one.scalars if k[1] == 1 and k[0].split("/")[-1] in (
      "loss", "grad_norm", "dmd_loss", "disc_loss", "fake_flow_matching_mse", "meanflow_mse",
      "flow_matching_mse", "critic_loss")]
  assert len(keys) >= 10
  for k in keys:
    np.testing.assert_allclose(sharded.scalars[k], one.scalars[k], rtol=2e-3, atol=1e-6,
                               err_msg=str(k))


def test_handoff_generator_starts_as_stage1_ema(one_device_run, data_dir):
  """Stage 2's first generator output equals stage 1's final EMA output on the same noise."""
  workdir, config, _, _ = one_device_run
  chain = pipeline.Chain(config, workdir, devices=jax.devices()[:1], writer=RecordingWriter())
  nets = chain.nets
  stage1 = TrajectoryStage(config, nets.student, nets.teacher, nets.conditions)
  stage2 = DistributionStage(config, nets.student, nets.teacher, nets.discriminator,
                             nets.conditions)
  e = jax.random.normal(jax.random.PRNGKey(3), (6,) + chain.source.shape)
  y = jax.tree.map(jnp.asarray, chain.source.eval_conditions(6))
  x0 = jnp.zeros((1,) + chain.source.shape)
  state = stage2.init(jax.random.PRNGKey(0), x0,
                      jax.tree.map(jnp.asarray, nets.conditions.example(1)),
                      chain.handoff("distribution"))
  stage1_ema = chain.load_export("trajectory")
  # The generator's weights are stage 1's final EMA weights, bit for bit ...
  jax.tree.map(np.testing.assert_array_equal, state.params, stage1_ema)
  # ... so it draws stage 1's one-step sketch. The two paths are different programs (stage 1's
  # sampler loops over steps under XLA, the generator runs op by op here), so XLA's fusion may
  # round a few elements differently in the last bit: equal to float32 precision.
  g = stage2.generate(state.params, e, y)
  sketch = stage1.sample(stage1_ema, e, y)
  np.testing.assert_allclose(np.asarray(g), np.asarray(sketch), rtol=1e-6, atol=1e-7)
  # The fake network starts as the teacher.
  jax.tree.map(np.testing.assert_array_equal, state.fake_params, chain.teacher_params)


def test_the_text_model_reads_the_words(one_device_run, experiment):
  """Text runs: swapping one word of the caption changes the one-step sample from the same
  noise, and the eval scores caption agreement."""
  if experiment != "digits_text":
    pytest.skip("class labels have no words")
  workdir, config, _, _ = one_device_run
  chain = pipeline.Chain(config, workdir, devices=jax.devices()[:1], writer=RecordingWriter())
  stage2 = DistributionStage(config, chain.nets.student, chain.nets.teacher,
                             chain.nets.discriminator, chain.nets.conditions)
  from hierdistill.data import digits_text as text_lib
  bold, thin = (jax.tree.map(jnp.asarray, text_lib.encode([p] * 4))
                for p in ("a bold, upright seven", "a thin, upright seven"))
  e = jax.random.normal(jax.random.PRNGKey(5), (4,) + chain.source.shape)
  params = chain.load_export("distribution")
  g_bold, g_thin = stage2.generate(params, e, bold), stage2.generate(params, e, thin)
  assert float(jnp.max(jnp.abs(g_bold - g_thin))) > 0.0  # exactly 0 if the words were ignored
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["real_caption_agreement"] == 1.0  # the captions were measured from them
  assert all(0 <= r["caption_agreement"] <= 1 for r in metrics["rows"])


def test_rerunning_a_finished_chain_does_no_work(one_device_run):
  workdir, config, _, _ = one_device_run
  config = config.copy_and_resolve_references()
  summary = pipeline.run(config, workdir, devices=jax.devices()[:1], writer=RecordingWriter())
  assert all(s["status"] == "finished earlier" for s in summary["stages"].values())
  assert summary["wall_time_s"] < 15


def test_resumed_stage_continues_from_its_last_checkpoint(one_device_run, data_dir, tmp_path):
  """Losing the final checkpoint, the teacher resumes at step 2 and ends bitwise identical."""
  ref_workdir, config, _, _ = one_device_run
  config = config.copy_and_resolve_references()
  config.stages = ("teacher",)
  workdir = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(ref_workdir, "teacher"), os.path.join(workdir, "teacher"))
  shutil.rmtree(os.path.join(workdir, "teacher", "checkpoints", "4"))  # "killed" after step 2
  summary = pipeline.run(config, workdir, devices=jax.devices()[:1], writer=RecordingWriter())
  assert summary["stages"]["teacher"]["steps_run"] == 2
  ref = pipeline.Chain(config, ref_workdir, devices=jax.devices()[:1], writer=RecordingWriter())
  new = pipeline.Chain(config, workdir, devices=jax.devices()[:1], writer=RecordingWriter())
  jax.tree.map(np.testing.assert_array_equal, new.load_export("teacher"),
               ref.load_export("teacher"))


def test_launch_runs_a_stage_and_writes_logs(tmp_path, data_dir):
  """The command line a user types: console progress, TensorBoard events, a grid, exit 0."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  cmd = [sys.executable, os.path.join(root, "launch", "main.py"),
         "--config=" + os.path.join(root, "experiments", "digits.py") + ":tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         "--config.stages=('teacher',)", "--config.teacher.num_steps=2"]
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "[teacher] step 2/2" in out.stdout
  assert "ETA" in out.stdout
  assert os.listdir(workdir / "tensorboard")
  assert (workdir / "teacher" / "samples_step2.png").exists()
  assert (workdir / "config.json").exists()


def test_launch_rejects_an_unknown_config_key(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "launch", "main.py"),
         "--config=" + os.path.join(root, "experiments", "digits.py") + ":tiny",
         f"--workdir={tmp_path}", "--config.teacher.num_stepz=2"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "num_stepz" in out.stderr


def test_toy2d_chain_runs_with_mode_metrics(tmp_path):
  """The 2-D experiment end to end: MLP networks, scatter plots, mode coverage in the eval."""
  from experiments import toy2d
  config = toy2d.get_config("tiny")
  workdir = str(tmp_path / "toy2d")
  summary = pipeline.run(config, workdir, writer=RecordingWriter())
  for stage in STAGES:
    assert summary["stages"][stage]["status"] == "trained"
    assert os.path.getsize(summary["stages"][stage]["samples"]) > 0
  rows = summary["eval"]["rows"]
  assert {"mode_coverage", "off_mode_fraction", "FD-points"} <= set(rows[0])
  for row in rows:
    assert 0 <= row["mode_coverage"] <= 1 and 0 <= row["off_mode_fraction"] <= 1


def test_unconditional_digits_chain_scores_class_coverage(tmp_path, data_dir):
  """Digits without labels (common.without_labels): one class, no guidance; its eval rows carry
  the per-class coverage of the samples against the data's, and no class accuracy."""
  config = digits.get_config("tiny,unconditional")
  assert config.model.num_classes == 1 and config.distribution.cfg_scale == 1.0
  config.data.data_dir = data_dir
  summary = pipeline.run(config, str(tmp_path / "run"), devices=jax.devices()[:1],
                         writer=RecordingWriter())
  for row in summary["eval"]["rows"]:
    assert "class_accuracy" not in row
    assert 0 <= row["class_coverage"] <= 1 and 0 <= row["class_tv"] <= 1
  with pytest.raises(ValueError, match="unknown variant 'tiny,labelless'"):
    digits.get_config("tiny,labelless")


def test_a_missing_published_teacher_file_is_named(tmp_path, data_dir):
  """A teacher given as a published file (imported by convert/) is looked for before anything
  compiles, for every experiment, not only ImageNet."""
  from hierdistill.config_checks import ConfigError
  config = tiny_config(data_dir)
  config.stages = ("trajectory",)
  config.teacher.init_checkpoint = str(tmp_path / "SiT-XL-2-256x256.pt")
  with pytest.raises(ConfigError, match=r"^config\.teacher\.init_checkpoint='.*SiT-XL-2-256x256"
                     r"\.pt': no such file; point it to a published SiT/DiT checkpoint"):
    pipeline.Chain(config, str(tmp_path / "run"), devices=jax.devices()[:1],
                   writer=RecordingWriter())
