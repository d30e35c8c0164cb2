"""Bad input gets a clear answer: each mistake is caught before anything compiles or is written,
with one line naming the problem and the fix (ConfigError; `error: ...` and exit status 2 from
the command line)."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import digits, mjhq_sana
from hierdistill import config_checks, pipeline
from hierdistill import workdir as workdir_lib
from hierdistill.config_checks import ConfigError
from hierdistill.sources.embedded import load_train_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _compiles.append(event) if event == COMPILE_EVENT else None)


class NullWriter:

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def flush(self):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  load_train_set(tiny_config(d).data)  # build the digits once, outside every check
  return d


def tiny_config(data_dir, **mesh):
  c = digits.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(mesh or dict(data=1, fsdp=1))
  return c


def rejects(config, workdir, match, devices=None, **kwargs) -> str:
  """Chain(config, workdir) raises ConfigError matching `match`, one line, having compiled and
  written nothing; returns the message."""
  workdir = str(workdir)
  before = _listing(workdir)
  n = len(_compiles)
  with pytest.raises(ConfigError, match=match) as e:
    pipeline.Chain(config, workdir, devices=devices or jax.devices()[:1], writer=NullWriter(),
                   **kwargs)
  message = str(e.value)
  assert "\n" not in message, message
  assert len(_compiles) == n, "something compiled before the error"
  assert _listing(workdir) == before, "something was written before the error"
  return message


def _listing(path):
  if not os.path.exists(path):
    return None
  return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getmtime(os.path.join(r, f)))
                for r, _, fs in os.walk(path) for f in fs)


def launch(*args, timeout=300):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "main.py"),
         "--config=" + os.path.join(ROOT, "experiments", "digits.py") + ":tiny", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, XLA_FLAGS=""))


def one_line_error(out) -> str:
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
  return lines[0]


# -- the command line ---------------------------------------------------------------------------
def test_unknown_config_key(tmp_path):
  line = one_line_error(launch(f"--workdir={tmp_path / 'run'}", "--config.teacher.num_stepz=2"))
  assert "--config.teacher.num_stepz: no such config key" in line
  assert "did you mean --config.teacher.num_steps?" in line
  assert not (tmp_path / "run").exists()


def test_value_of_the_wrong_type(tmp_path):
  line = one_line_error(launch(f"--workdir={tmp_path / 'run'}",
                               "--config.teacher.num_steps=four"))
  assert "--config.teacher.num_steps=four" in line and "give a value of the type" in line
  assert not (tmp_path / "run").exists()


def test_text_encoder_batch_size_is_a_count_of_prompts():
  config = mjhq_sana.get_config("runlocal")
  config.text_encoder.batch_size = -1
  with pytest.raises(ConfigError, match=r"^config\.text_encoder\.batch_size=-1 must be an "
                     r"integer >= 0\.$"):
    config_checks.validate_config(config)
  config.text_encoder.batch_size = 0  # every prompt of a call at once
  config_checks.validate_config(config)


def test_missing_config_file(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "main.py"),
         "--config=" + os.path.join(ROOT, "experiments", "digitz.py"),
         f"--workdir={tmp_path / 'run'}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  line = one_line_error(out)
  assert "digitz.py: no such file" in line and "did you mean" in line and "digits.py" in line
  assert not (tmp_path / "run").exists()


def test_launch_prints_a_pipeline_error_as_one_line(tmp_path, data_dir):
  """A ConfigError raised past flag parsing (here: the mesh) is one line and status 2 too."""
  line = one_line_error(launch(f"--workdir={tmp_path / 'run'}",
                               f"--config.data.data_dir={data_dir}", "--config.mesh.data=3"))
  assert "config.mesh: data=3 x fsdp=1 does not match the 1 devices" in line
  assert not (tmp_path / "run").exists()


# -- devices ------------------------------------------------------------------------------------
def test_batch_not_divisible_by_the_devices(tmp_path, data_dir):
  config = tiny_config(data_dir, data=8, fsdp=1)
  config.trajectory.batch_size = 12
  rejects(config, tmp_path / "run", r"config\.trajectory\.batch_size=12 is not divisible by "
          r"the 8 devices.*use a multiple of 8", devices=jax.devices())


def test_mesh_that_does_not_match_the_devices(tmp_path, data_dir):
  rejects(tiny_config(data_dir, data=4, fsdp=4), tmp_path / "run",
          r"config\.mesh: data=4 x fsdp=4 does not match the 8 devices.*product 8",
          devices=jax.devices())


# -- data and model -----------------------------------------------------------------------------
def test_missing_data_set(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.data.name = "imagenet64"
  rejects(config, tmp_path / "run", r"config\.data\.name='imagenet64': no such data set; "
          r"choose from .*digits8x8")
  # A data set that has to be built where nothing can be written.
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  config = tiny_config(str(blocker / "tfds"))
  rejects(config, tmp_path / "run", r"config\.data\.name='digits8x8' cannot be loaded from "
          r"config\.data\.data_dir=.*: .*not writable.*; point --config\.data\.data_dir")


def test_class_count_differs_between_data_and_model(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.model.num_classes = 7
  rejects(config, tmp_path / "run", r"config\.model\.num_classes=7 but the data set "
          r"'digits8x8' has 10 classes; set --config\.model\.num_classes=10")


def test_image_size_not_divisible_by_the_patch_size(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.model.patch_size = 3
  rejects(config, tmp_path / "run", r"config\.model\.input_size=8 is not divisible by "
          r"config\.model\.patch_size=3")


def test_impossible_order_of_stages(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.stages = ("trajectory", "teacher")
  rejects(config, tmp_path / "run", r"not in the order \('teacher', 'trajectory'")
  # Stage 2 from stage 1's result, with stage 1 neither run nor finished.
  config.stages = ("teacher", "distribution")
  rejects(config, tmp_path / "run", r"stage 'distribution' starts from stage 1's result.*add "
          r"'trajectory' to config\.stages, or set --config\.distribution\.init_from=teacher")


# -- checkpoints given as input -----------------------------------------------------------------
def test_missing_teacher_checkpoint(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.stages = ("trajectory", "distribution")
  rejects(config, tmp_path / "run", r"stage 'trajectory' needs a teacher, but .* has no "
          r"finished teacher stage.*add 'teacher' to config\.stages, or set "
          r"--config\.teacher\.init_checkpoint")
  config.teacher.init_checkpoint = str(tmp_path / "no_such_export")
  rejects(config, tmp_path / "run", r"init_checkpoint=.*no_such_export: no such directory; "
          r"point it to a directory of exported params")
  (tmp_path / "not_a_checkpoint").mkdir()
  config.teacher.init_checkpoint = str(tmp_path / "not_a_checkpoint")
  rejects(config, tmp_path / "run", r"init_checkpoint=.*not_a_checkpoint is not a params "
          r"checkpoint that orbax reads \(.*\); point it to a directory of exported params")


def save_teacher_params(config, data_dir, path, **model):
  """Exported teacher params (zeros) of the tiny model with `model` changed."""
  config = config.copy_and_resolve_references()
  config.model.update(model)
  abstract = pipeline.Networks(config).abstract_params((8, 8, 1), student=False)
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(path), params)
  return abstract


def test_teacher_checkpoint_that_does_not_fit_the_model(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.stages = ("trajectory",)
  wide = save_teacher_params(config, data_dir, tmp_path / "wide", hidden_size=48)
  config.teacher.init_checkpoint = str(tmp_path / "wide")
  # The first parameter (in the model's own order) whose shape differs is named.
  ours = pipeline.Networks(config).abstract_params((8, 8, 1), student=False)
  first = next(jax.tree_util.keystr(p) for (p, a), b in zip(
      jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(wide))
               if a.shape != b.shape)
  name = "/".join(k.key for k in next(
      p for p, _ in jax.tree_util.tree_flatten_with_path(ours)[0]
      if jax.tree_util.keystr(p) == first))
  message = rejects(config, tmp_path / "run", r"does not fit the model: parameter '" + name)
  assert "set config.model to the teacher's architecture" in message
  # A deeper teacher: the first parameter the model lacks is named too.
  save_teacher_params(config, data_dir, tmp_path / "deep", depth=3)
  config.teacher.init_checkpoint = str(tmp_path / "deep")
  rejects(config, tmp_path / "run", r"it has parameter 'blocks_2/.*', which the model lacks")


def test_teacher_checkpoint_that_fits_is_accepted(tmp_path, data_dir):
  """The check is not over-eager: a teacher of this model passes, and nothing compiles yet."""
  config = tiny_config(data_dir)
  config.stages = ("trajectory",)
  save_teacher_params(config, data_dir, tmp_path / "teacher")
  config.teacher.init_checkpoint = str(tmp_path / "teacher")
  chain = pipeline.Chain(config, str(tmp_path / "run"), devices=jax.devices()[:1],
                         writer=NullWriter())
  assert float(jnp.sum(jax.tree.leaves(chain.teacher_params)[0])) == 0.0


# -- the workdir --------------------------------------------------------------------------------
def test_workdir_that_is_not_writable(tmp_path, data_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  rejects(tiny_config(data_dir), blocker / "run", r"workdir .* cannot be created: .*a_file is a "
          r"file, not a directory; choose another --workdir")
  if os.geteuid() != 0:  # root writes anywhere: the permission case needs an ordinary user
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    rejects(tiny_config(data_dir), locked / "run", r"is not writable .*permission denied")


def test_a_run_stored_before_scan_blocks_resumes_unrolled_only(tmp_path, data_dir):
  """A config stored before model.scan_blocks existed held its blocks unrolled: resuming it
  scanned names the key, resuming it as it was passes."""
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir)
  pipeline.Chain(config, workdir, devices=jax.devices()[:1], writer=NullWriter())
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    stored = json.load(f)
  del stored["model"]["scan_blocks"]
  with open(path, "w") as f:
    json.dump(stored, f)
  scanned = config.copy_and_resolve_references()
  scanned.model.scan_blocks = True
  rejects(scanned, workdir, r"different config \(model\.scan_blocks: False there, True here\)")
  pipeline.Chain(config, workdir, devices=jax.devices()[:1], writer=NullWriter())


def test_workdir_of_a_different_config(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir)
  pipeline.Chain(config, workdir, devices=jax.devices()[:1], writer=NullWriter())
  assert os.path.exists(os.path.join(workdir, "config.json"))
  other = config.copy_and_resolve_references()
  other.seed = 1
  other.model.depth = 3
  rejects(other, workdir, r"holds a run of a different config \(model\.depth: 2 there, 3 "
          r"here, and 1 more\); .*another --workdir, or pass --overwrite")
  # What may change on resume: logging, checkpointing, stages, mesh; num_steps of a stage
  # that has not run past it and whose result no later stage used.
  same = config.copy_and_resolve_references()
  same.teacher.update(log_every=1, checkpoint_every=1, num_steps=9)
  same.stages = ("teacher",)
  pipeline.Chain(same, workdir, devices=jax.devices()[:1], writer=NullWriter())
  os.makedirs(os.path.join(workdir, "teacher", "checkpoints", "9"))
  shorter = same.copy_and_resolve_references()
  shorter.teacher.num_steps = 6
  rejects(shorter, workdir, r"config\.teacher\.num_steps=6 but the teacher stage .* already has "
          r"a checkpoint at step 9")
  os.makedirs(os.path.join(workdir, "trajectory", "checkpoints", "2"))
  longer = same.copy_and_resolve_references()
  longer.teacher.num_steps = 12
  rejects(longer, workdir, r"config\.teacher\.num_steps changed \(9 there, 12 here\) but the "
          r"trajectory stage .* already started from the teacher stage's result")
  # --overwrite moves the old run aside, whole, and starts anew.
  pipeline.Chain(other, workdir, devices=jax.devices()[:1], writer=NullWriter(), overwrite=True)
  moved = [d for d in os.listdir(tmp_path) if d.startswith("run.replaced-")]
  assert len(moved) == 1
  assert os.path.isdir(tmp_path / moved[0] / "teacher" / "checkpoints" / "9")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["depth"] == 3


def test_settings_of_a_stage_not_started_may_change(tmp_path, data_dir):
  """A finished teacher and stage 1 take new stage-2 settings in the same workdir: nothing there
  was computed with them. A stage that has started, or whose result a later stage has used,
  keeps its settings, and so do the keys every stage shares."""
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir)
  pipeline.Chain(config, workdir, devices=jax.devices()[:1], writer=NullWriter())
  os.makedirs(os.path.join(workdir, "trajectory", "checkpoints", "3"))
  # No teacher checkpoint: as with teacher.init_checkpoint, stage 1 still learnt from it.
  stage2 = config.copy_and_resolve_references()
  stage2.distribution.gen_adv_weight = config.distribution.gen_adv_weight + 0.2
  stage2.distribution.optimizer.lr = 3e-5
  stage2.distribution.discriminator.pooling = "mean"
  assert not workdir_lib.check_previous_run(stage2, workdir)
  for key, value in (("trajectory.cfg_scale", 2.5), ("teacher.t_mu", 0.3),
                     ("model.depth", 3), ("seed", 7)):
    changed = stage2.copy_and_resolve_references()
    block, _, name = key.rpartition(".")
    (changed[block] if block else changed)[name] = value
    with pytest.raises(ConfigError, match=rf"different config \({re.escape(key)}: "):
      workdir_lib.check_previous_run(changed, workdir)
  # Once stage 2 has a checkpoint its settings are fixed too.
  os.makedirs(os.path.join(workdir, "distribution", "checkpoints", "1"))
  with pytest.raises(ConfigError, match=r"different config \(distribution\.\S+: .*and 2 more\)"):
    workdir_lib.check_previous_run(stage2, workdir)


def test_workdir_that_even_root_cannot_write(tmp_path, data_dir):
  """Write permission is tried, not read from the permission bits (which root ignores): an
  immutable directory (chattr +i) refuses root too, and is one line before anything starts."""
  locked = tmp_path / "immutable"
  locked.mkdir()
  if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
    pytest.skip("chattr +i is not available here (needs root on a filesystem that has it)")
  try:
    rejects(tiny_config(data_dir), locked / "run", r"^workdir .*immutable/run is not writable "
            r"\(.*immutable: operation not permitted\); choose a --workdir you can write to\.$")
    rejects(tiny_config(data_dir), locked, r"^workdir .*immutable is not writable")
  finally:
    subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_workdir_where_the_permission_bits_lie(tmp_path, data_dir):
  """sysfs: os.access says root may write to /sys, yet it refuses to make a directory there."""
  if not (os.path.isdir("/sys") and os.access("/sys", os.W_OK)):
    pytest.skip("no /sys that the permission bits call writable")
  rejects(tiny_config(data_dir), "/sys/hierdistill_run", r"^workdir /sys/hierdistill_run is not "
          r"writable \(/sys: .*\); choose a --workdir you can write to\.$")


# -- the files other commands write -------------------------------------------------------------
@pytest.mark.parametrize("script, args, flag", [
    ("sample.py", ["--from=runs/none"], "--out=/proc/self/samples.png"),
    ("extract_latents.py", ["--config=" + os.path.join(ROOT, "experiments", "imagenet256.py")
                            + ":runlocal"], "--config.data.latents_dir=/proc/hierdistill"),
    ("extract_t2i_latents.py", ["--config=" + os.path.join(ROOT, "experiments", "mjhq_sana.py")
                                + ":runlocal"], "--config.data.latents_dir=/proc/hierdistill"),
])
def test_an_output_folder_that_cannot_be_written_is_one_line_before_the_work(script, args, flag):
  """/proc exists, and even root cannot make anything in it: the folder is tried before any
  network loads or any sample is drawn, as a workdir is."""
  if not os.path.isdir("/proc/self"):
    pytest.skip("no /proc here")
  cmd = [sys.executable, os.path.join(ROOT, "launch", script), *args, flag]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, XLA_FLAGS=""))
  line = one_line_error(out)
  assert re.search(r" is not writable \(/proc\S*: .*\); choose a --\S+ you can write to\.$",
                   line), line
  assert "[sample]" not in out.stdout and "[extract]" not in out.stdout
