"""The product of a run: hierdistill.Generator from a workdir and from an export, the one-step
equation, the teacher through the same API, compile once a batch size, any device count, the
export's published key layout read back by the importer, damaged exports, text prompts, and
launch/sample.py and launch/export.py."""
import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hierdistill
from experiments import digits
from hierdistill import generator
from hierdistill import pipeline
from hierdistill import sources
from hierdistill.config_checks import ConfigError
from hierdistill.convert import dit as convert_dit
from hierdistill.convert import dit_layout
from hierdistill.models.dit import DiT
from hierdistill.models.student import init_student_from_teacher
from hierdistill.stages import common

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
def run(tmp_path_factory):
  """A finished tiny digits chain (every stage and the eval) on 1 device."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("run"))
  config = digits.get_config("tiny")
  config.data.data_dir = data_dir
  config.mesh.update(data=1, fsdp=1)
  pipeline.run(config, workdir, devices=jax.devices()[:1], writer=NullWriter())
  return workdir, config


@pytest.fixture(scope="module")
def gen(run):
  return hierdistill.Generator.load(run[0], devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  """The run exported from a copy of its workdir, which is then deleted: the export stands alone."""
  copy = str(tmp_path_factory.mktemp("copy") / "run")
  shutil.copytree(run[0], copy)
  out = str(tmp_path_factory.mktemp("exports") / "digits")
  generator.export_run(copy, out)
  shutil.rmtree(copy)
  return out


def test_one_step_is_the_readme_equation(gen, run):
  """images = x = e - u(e, 0, 1 | c), e = jax.random.normal(key, (B,) + shape), clipped."""
  assert gen.role == "student" and gen.info["stage"] == "distribution"
  key, labels = jax.random.PRNGKey(3), [3, 7, 7, 0]
  images = gen(key, labels)
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.float32
  e = jax.random.normal(key, (4, 8, 8, 1))
  one = jnp.ones((4,))
  u = common.apply_model(gen.model, gen.params, e, 0.0 * one, one, jnp.asarray(labels))
  np.testing.assert_allclose(images, np.clip(e - u, -1, 1), atol=1e-5)
  # Not one image repeated: the samples depend on the label and the noise.
  assert np.abs(images[1] - images[2]).max() > 1e-3 and np.abs(images[0] - images[1]).max() > 1e-3


def test_same_key_same_images_and_one_compile_per_batch_size(gen):
  key = jax.random.PRNGKey(11)
  gen(key, [1, 2, 3])
  n = len(_compiles)
  a = gen(key, [1, 2, 3])
  assert len(_compiles) == n, "a second call with the same batch size compiled again"
  np.testing.assert_array_equal(a, gen(key, [1, 2, 3]))
  assert not np.array_equal(a, gen(jax.random.PRNGKey(12), [1, 2, 3]))
  gen(key, [1, 2, 3, 4, 5])
  assert len(_compiles) > n  # a new batch size is a new program


def test_a_time_grid_is_the_jumps_it_names(gen):
  """times=(1, 0.75, 0): z = e - 0.25 u(e, 0.75, 1), x = z - 0.75 u(z, 0, 0.75); the uniform
  grid named as times is num_steps=2; a grid that cannot be sampled is one line."""
  # The tiny run's few steps leave u nearly blind to (r, t) (zero-initialised modulation):
  # its weights are moved so that the grid shows in the images.
  leaves, tree = jax.tree.flatten(gen.params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  gen = copy.copy(gen)
  gen.params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                         for p, k in zip(leaves, keys)])
  gen._programs = {}  # pylint: disable=protected-access
  key, labels = jax.random.PRNGKey(5), [3, 7]
  e, c, one = jax.random.normal(key, (2, 8, 8, 1)), jnp.asarray(labels), jnp.ones((2,))
  u = lambda z, r, t: common.apply_model(gen.model, gen.params, z, r * one, t * one, c)
  z = e - 0.25 * u(e, 0.75, 1.0)
  images = gen(key, labels, times=(1, 0.75, 0))
  np.testing.assert_allclose(images, np.clip(z - 0.75 * u(z, 0.0, 0.75), -1, 1), atol=1e-5)
  uniform = gen(key, labels, 2)
  np.testing.assert_allclose(gen(key, labels, times=[1, 0.5, 0]), uniform, atol=1e-6)
  assert np.abs(images - uniform).max() > 1e-4  # the grid is not ignored
  with pytest.raises(ValueError, match="disagree"):
    gen(key, labels, 3, times=(1, 0.5, 0))
  with pytest.raises(ValueError, match="decrease strictly"):
    gen(key, labels, times=(1, 0.2, 0.6, 0))


def test_teacher_through_the_same_api(run):
  workdir, config = run
  teacher = hierdistill.Generator.load(workdir, stage="teacher", devices=jax.devices()[:1])
  assert teacher.role == "teacher"
  key, labels = jax.random.PRNGKey(0), np.array([2, 5], np.int32)
  images = teacher(key, labels, num_steps=3, cfg_scale=2.0)
  e = jax.random.normal(key, (2, 8, 8, 1))
  config = config.copy_and_resolve_references()
  config.sample.cfg_scale = 2.0
  expected = common.sample_teacher(config, teacher.model, teacher.conditions, teacher.params, e,
                                   jnp.asarray(labels), num_steps=3)
  np.testing.assert_allclose(images, np.clip(expected, -1, 1), atol=1e-5)
  assert teacher.nfe(3, 2.0) == 6
  with pytest.raises(ValueError, match="a student takes no cfg_scale"):
    hierdistill.Generator.load(workdir, devices=jax.devices()[:1])(key, [1], cfg_scale=2.0)


def test_any_device_count_gives_the_same_images(run, gen):
  """3 samples on 8 devices (padded to 8, trimmed) equal those of 1 device."""
  on_8 = hierdistill.Generator.load(run[0], devices=jax.devices())
  assert on_8.mesh.devices.size == 8
  key = jax.random.PRNGKey(5)
  np.testing.assert_allclose(on_8(key, [4, 5, 6]), gen(key, [4, 5, 6]), atol=1e-5)


def test_bad_conditions_are_one_line(gen, tmp_path):
  with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
    gen(jax.random.PRNGKey(0), [3, 11])
  with pytest.raises(ValueError, match="give class labels, not prompts"):
    gen(jax.random.PRNGKey(0), ["a bold seven"])
  with pytest.raises(ConfigError, match="neither a run's workdir"):
    hierdistill.Generator.load(str(tmp_path))
  with pytest.raises(ConfigError, match="no such directory"):
    hierdistill.Generator.load(str(tmp_path / "nothing"))


# -- export ----------------------------------------------------------------------------------------

def test_export_loads_alone_and_draws_the_same_images(exported, gen):
  files = set(os.listdir(exported))
  assert {"model.safetensors", "config.json", "eval.json", "eval.md", "samples.png",
          "README.md"} <= files
  meta = json.load(open(os.path.join(exported, "config.json")))
  assert meta["role"] == "student" and meta["weights"]["kind"] == "velocity"
  assert meta["conditions"] == {"kind": "labels", "num_classes": 10, "null_label": 10,
                                "describe": "class labels, 10 classes, null label 10"}
  assert meta["conventions"]["time_embedder_input"] == "1 * t"
  assert meta["model"]["fields"]["interval_conditioning"] is True
  rows = json.load(open(os.path.join(exported, "eval.json")))["rows"]
  assert any(r["model"].startswith("stage 2 (HD)") for r in rows)
  assert "FD-digits" in open(os.path.join(exported, "README.md")).read()
  loaded = hierdistill.Generator.load(exported, devices=jax.devices()[:1])
  key = jax.random.PRNGKey(7)
  np.testing.assert_array_equal(loaded(key, [1, 8, 8]), gen(key, [1, 8, 8]))


def test_the_model_card_is_shareable(exported, run):
  """The card's snippet loads the export by its final directory's name (not the temporary
  <out>.partial-<pid> it was written in), and it records the run by experiment, config hash and
  step, with no path of the training machine (issue 22, item 6)."""
  card = open(os.path.join(exported, "README.md")).read()
  meta = json.load(open(os.path.join(exported, "config.json")))
  assert 'Generator.load("digits")' in card and "partial" not in card
  assert os.sep + "tmp" not in card and "copy" not in card and run[0] not in card
  source = meta["source"]
  assert "workdir" not in source and "export" not in source
  assert source["experiment"] == run[1].name and source["step"] == run[1].distribution.num_steps
  assert len(source["config_sha256"]) == 12 and source["config_sha256"] in card
  assert f"experiment {run[1].name}" in card and f"step\n{source['step']}" in card


@pytest.mark.torch
def test_a_run_exports_for_the_official_code_in_one_step_only(run, tmp_path):
  """export_run(fmt='dit'): the official checkpoint, its card naming the final directory; two
  steps are refused before anything is written (tests/test_export_formats.py checks the
  numbers)."""
  pytest.importorskip("torch")
  out = str(tmp_path / "digits_dit")
  meta = generator.export_run(run[0], out, fmt="dit")
  assert sorted(os.listdir(out)) == ["README.md", "export.json", "model.pt"]
  card = open(os.path.join(out, "README.md")).read()
  assert '"digits_dit/model.pt"' in card and "partial" not in card and run[0] not in card
  assert meta["source"]["experiment"] == run[1].name
  with pytest.raises(ConfigError, match=r"--num_steps=2: the student's interval embedding"):
    generator.export_run(run[0], str(tmp_path / "two"), fmt="dit", num_steps=2)
  assert not os.path.exists(tmp_path / "two")


def test_exported_keys_are_the_published_layout_plus_the_interval_embedder(exported, gen):
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(exported, "model.safetensors"))
  m = gen.model
  layout = convert_dit.published_layout(
      depth=m.depth, hidden_size=m.hidden_size, patch_size=m.patch_size,
      in_channels=m.in_channels, out_channels=m.resolved_out_channels,
      num_classes=m.num_classes, input_size=m.input_size, mlp_ratio=m.mlp_ratio)
  interval = {k for k in tensors if k.startswith("interval_embedder.")}
  assert interval == {f"interval_embedder.mlp.{i}.{w}" for i in (0, 2)
                      for w in ("weight", "bias")}
  assert {k: tuple(v.shape) for k, v in tensors.items() if k not in interval} == layout


def test_a_sit_convention_export_is_read_back_by_the_importer():
  """A SiT-convention network (its embedder reads 1 - t) is stored as SiT stores it, so
  convert/dit.import_dit(kind='sit') reads the teacher part back exactly, and the student's
  interval embedder comes back through the layout's own reader."""
  kw = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
            num_classes=5, out_channels=8, time_scale=1.0, time_flip=True)
  teacher, student = DiT(**kw), DiT(**kw, interval_conditioning=True)
  z, t, y = jnp.zeros((1, 8, 8, 4)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
  # Jitted: one compile each, not one per operation.
  t_params = jax.jit(lambda k: teacher.init(k, z, None, t, y)["params"])(jax.random.PRNGKey(0))
  s_params = jax.jit(lambda k: student.init(k, z, t, t, y)["params"])(jax.random.PRNGKey(1))
  s_params = init_student_from_teacher(s_params, t_params)
  s_params = jax.tree.map(lambda a: a + 0.01, s_params)  # the interval embedder not all zero
  assert dit_layout.kind_of(student) == "sit"
  tensors = dit_layout.to_published(s_params, student)
  teacher_part = {k: v for k, v in tensors.items() if not k.startswith("interval_embedder.")}
  imported = convert_dit.import_dit(teacher_part, teacher, kind="sit")
  back = dit_layout.from_published(tensors, student)
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v)
                       for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want = flat(s_params)
  for k, v in flat(imported).items():
    np.testing.assert_allclose(v, want[k], rtol=0, atol=0, err_msg=k)
  assert flat(back).keys() == want.keys()
  for k, v in flat(back).items():
    np.testing.assert_allclose(v, want[k], rtol=0, atol=0, err_msg=k)
  # SiT's sign: the file's prediction rows are the negated velocity (x - e).
  p = tensors["final_layer.linear.bias"].reshape(2, 2, 8)
  np.testing.assert_allclose(p[..., :4], -np.asarray(s_params["final_layer"]["linear"]["bias"]
                                                      ).reshape(2, 2, 8)[..., :4])


def _copy(exported, tmp_path):
  dest = str(tmp_path / "copy")
  shutil.copytree(exported, dest)
  return dest


def test_a_damaged_or_mismatched_export_is_one_line(exported, tmp_path):
  damaged = _copy(exported, tmp_path)
  with open(os.path.join(damaged, "model.safetensors"), "r+b") as f:
    f.seek(200)
    byte = f.read(1)
    f.seek(200)
    f.write(bytes([byte[0] ^ 0xFF]))
  cases = [(damaged, r"model\.safetensors is damaged \(its SHA-256 differs")]
  missing = str(tmp_path / "missing")
  shutil.copytree(exported, missing)
  os.remove(os.path.join(missing, "model.safetensors"))
  cases.append((missing, r"model\.safetensors is missing from the export"))
  mismatched = str(tmp_path / "mismatched")
  shutil.copytree(exported, mismatched)
  meta_path = os.path.join(mismatched, "config.json")
  meta = json.load(open(meta_path))
  meta["model"]["fields"]["depth"] = 3
  json.dump(meta, open(meta_path, "w"))
  cases.append((mismatched, r"does not fit the network in config\.json: it lacks parameter "
                            r"'blocks_2/"))
  newer = str(tmp_path / "newer")
  shutil.copytree(exported, newer)
  meta = json.load(open(os.path.join(newer, "config.json")))
  meta["version"] = 99
  json.dump(meta, open(os.path.join(newer, "config.json"), "w"))
  cases.append((newer, r"format version 99; this hierdistill reads version 1"))
  for path, match in cases:
    with pytest.raises(ConfigError, match=match) as e:
      hierdistill.Generator.load(path, devices=jax.devices()[:1])
    assert "\n" not in str(e.value)


def test_export_refuses_a_directory_that_is_not_empty(run, tmp_path):
  (tmp_path / "x").write_text("keep me")
  with pytest.raises(ConfigError, match="is not empty"):
    generator.export_run(run[0], str(tmp_path))
  assert (tmp_path / "x").read_text() == "keep me"


# -- text ----------------------------------------------------------------------------------------

def random_generator(config, perturb=None):
  """A Generator of config's student at its random init (then `perturb`(params), if given):
  what a user builds by hand from a model and params."""
  source = sources.source_class(config.data.name)
  conditions = source.condition_kind(config)
  nets = pipeline.Networks(config, conditions)
  shape = source.example_shape(config)
  x, t = jnp.zeros((1,) + shape), jnp.ones((1,))
  c = jax.tree.map(jnp.asarray, conditions.example(1))
  params = jax.jit(lambda k: nets.student.init(k, x, t, t, c)["params"])(jax.random.PRNGKey(0))
  if perturb is not None:
    params = perturb(params)
  return generator.Generator(model=nets.student, params=params, conditions=conditions,
                             shape=shape, role="student", sample_config=config.sample.to_dict(),
                             data_name=config.data.name, model_config=config.model.to_dict(),
                             devices=jax.devices()[:1])


def test_a_text_generator_reads_prompts_and_exports(tmp_path):
  """Prompts go through the data source's encoder (DigitsTextSource.conditions_from_prompts);
  a text DiT is exported under its Flax paths with the empty prompt's encoding, and reads
  back to the same images."""
  from experiments import digits_text
  from hierdistill.generator import Generator
  config = digits_text.get_config("tiny")
  source = sources.source_class(config.data.name)
  gen = random_generator(config)
  conditions, shape = gen.conditions, gen.shape
  prompts = ["a bold, upright seven", "a thin, left-leaning two"]
  key = jax.random.PRNGKey(0)
  images = gen(key, prompts)
  assert images.shape == (2, 8, 8, 1)
  encoded = source.conditions_from_prompts(config, prompts)
  e = jax.random.normal(key, (2,) + shape)
  one = jnp.ones((2,))
  u = common.apply_model(gen.model, gen.params, e, 0 * one, one,
                         jax.tree.map(jnp.asarray, encoded))
  np.testing.assert_allclose(images, np.clip(e - u, -1, 1), atol=1e-5)
  with pytest.raises(ValueError, match="unknown word"):
    gen(key, ["a purple seven"])
  with pytest.raises(ValueError, match="give prompts"):
    gen(key, [3])
  out = str(tmp_path / "text_export")
  os.makedirs(out)
  generator.write_export(gen, out, run_config=config, grid_size=20)
  meta = json.load(open(os.path.join(out, "config.json")))
  assert meta["weights"]["layout"] == "flax paths"
  assert meta["conditions"]["kind"] == "text" and meta["conditions"]["null_prompt"] == ""
  loaded = Generator.load(out, devices=jax.devices()[:1])
  np.testing.assert_array_equal(loaded.conditions.null_embeddings,
                                conditions.null_embeddings)
  np.testing.assert_array_equal(loaded(key, prompts), images)


# -- the commands --------------------------------------------------------------------------------

def _launch(script, *args, timeout=300):
  cmd = [sys.executable, os.path.join(ROOT, "launch", script), *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, XLA_FLAGS=""))


def test_sample_command_records_the_seed_and_repeats(run, tmp_path):
  outs = []
  for name in ("a.npz", "b.npz"):
    out = str(tmp_path / name)
    res = _launch("sample.py", f"--from={run[0]}", "--num=6", "--labels=3,7", "--steps=1",
                  "--seed=4", "--batch_size=4", f"--out={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[sample] 4/6" in res.stdout and "seed 4" in res.stdout
    outs.append(np.load(out))
  np.testing.assert_array_equal(outs[0]["samples"], outs[1]["samples"])
  np.testing.assert_array_equal(outs[0]["labels"], [3, 7, 3, 7, 3, 7])
  record = json.load(open(str(tmp_path / "a.npz") + ".json"))
  assert record["seed"] == 4 and record["stage"] == "distribution" and record["nfe"] == 1
  # A student's time grid: two jumps through t = 0.75, recorded.
  res = _launch("sample.py", f"--from={run[0]}", "--num=2", "--times=1,0.75,0",
                f"--out={tmp_path / 'd.npz'}")
  assert res.returncode == 0, res.stderr[-2000:]
  record = json.load(open(str(tmp_path / "d.npz") + ".json"))
  assert record["times"] == [1.0, 0.75, 0.0] and record["steps"] == 2 and record["nfe"] == 2
  bad = _launch("sample.py", f"--from={run[0]}", "--times=1,0.5", f"--out={tmp_path / 'e.png'}")
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
  assert "ends at 0 (the data)" in bad.stderr
  bad = _launch("sample.py", f"--from={run[0]}", "--labels=3,12", f"--out={tmp_path / 'c.png'}")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      "error: labels must lie in 0..9 (10 = the null label, unconditional); got 3..12."]


@pytest.mark.slow  # two more processes; the export itself is tested in-process above
def test_export_command(run, tmp_path):
  out = tmp_path / "export"
  res = _launch("export.py", f"--from={run[0]}", f"--out={out}", "--grid_size=20")
  assert res.returncode == 0, res.stderr[-2000:]
  assert (out / "samples.png").exists() and (out / "model.safetensors").exists()
  again = _launch("export.py", f"--from={run[0]}", f"--out={out}")
  assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
  assert "is not empty" in again.stderr


@pytest.mark.slow  # the runlocal ImageNet chain: mock latents, a random VAE, three stages
def test_a_latent_run_decodes_and_exports(tmp_path):
  """A latent model's images come out decoded by its VAE (pixels, not latents); its export
  stores SiT's convention (the run's model embeds 1 - t) with the VAE's description, and loads
  to the same images."""
  from experiments import imagenet256
  config = imagenet256.get_config("runlocal")
  config.stages = ("teacher", "trajectory")  # runlocal trains a tiny teacher in place of SiT's
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir, devices=jax.devices()[:1], writer=NullWriter())
  gen = hierdistill.Generator.load(workdir, devices=jax.devices()[:1])
  assert gen.decoder is not None and gen.info["stage"] == "trajectory"
  size = config.data.image_size
  key = jax.random.PRNGKey(0)
  images = gen(key, [1, 2])
  assert images.shape == (2, size, size, 3) and np.abs(images).max() <= 1.0
  out = str(tmp_path / "export")
  meta = generator.export_run(workdir, out, grid_size=4)
  assert meta["weights"]["kind"] == "sit" and meta["vae"]["random_init"] is True
  assert meta["vae"]["scaling_factor"] == pytest.approx(config.vae.scaling_factor)
  assert os.path.isfile(os.path.join(out, "vae.safetensors"))
  np.testing.assert_allclose(hierdistill.Generator.load(out, devices=jax.devices()[:1])(
      key, [1, 2]), images, atol=1e-5)
