"""The one-step SANA student as a diffusers folder (issue 22): runlocal's networks (tiny SANA
student, random DC-AE, the mock's tiny Gemma-2 and word tokenizer) exported with
--format=diffusers load in diffusers.SanaPipeline, whose images for given latents and prompts
are the generator's; the folder is read back as a teacher / init_checkpoint (round trip)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import mjhq_sana
from hierdistill import export_formats
from hierdistill import sources
from hierdistill.config_checks import ConfigError
from hierdistill.data import t2i_mock
from hierdistill.generator import Generator
from hierdistill.convert.from_config import random_vae_params
from hierdistill.models import registry
from hierdistill.models.dcae import AutoencoderDC

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch  # every test here reads the export with diffusers

INFO = {"experiment": "mjhq_sana_runlocal", "stage": "distribution", "step": 4}
PROMPTS = list(t2i_mock.GRID_PROMPTS[:2])


@pytest.fixture(scope="module")
def sana_student(tmp_path_factory):
  """runlocal's config with its mock files, and a Generator of a SANA student whose every param
  is random (the interval embedder too), decoded by runlocal's random DC-AE."""
  config = mjhq_sana.get_config("runlocal")
  # Of the mock files only the Gemma tokenizer is read here (no images, no teacher to write).
  files = t2i_mock.make(str(tmp_path_factory.mktemp("mock")), num_pairs=1, image_size=8,
                        mjhq_per_category=0, mjhq_size=8)
  config.text_encoder.tokenizer = files["gemma_tokenizer"]
  source = sources.source_class(config.data.name)
  shape = source.example_shape(config)
  student = registry.build(config.model).clone(interval_conditioning=True)
  c = {"embeddings": jnp.zeros((1, 3, student.caption_channels)),
       "mask": jnp.ones((1, 3), jnp.int32)}
  t = jnp.ones((1,))
  params = jax.jit(lambda k: student.init(k, jnp.zeros((1,) + shape), t, t, c)["params"])(
      jax.random.PRNGKey(0))
  # runlocal's DC-AE with numpy-drawn weights: flax's init of it takes most of a minute here.
  dcae = AutoencoderDC(**config.vae.sizes.to_dict(), scaling_factor=config.vae.scaling_factor)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: np.asarray(p, np.float32)
                        + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)
  gen = Generator(model=student, params=params, conditions=source.condition_kind(config),
                  shape=shape, role="student", sample_config=config.sample.to_dict(),
                  data_name=config.data.name, model_config=config.model.to_dict(),
                  decoder=(dcae, random_vae_params(dcae, 0)), info=INFO,
                  devices=jax.devices()[:1],
                  prompt_config={"text_encoder": config.text_encoder.to_dict(),
                                 "seed": config.seed})
  return config, gen, source


@pytest.fixture(scope="module")
def exported(sana_student, tmp_path_factory):
  config, gen, _ = sana_student
  out = str(tmp_path_factory.mktemp("exports") / "sana_student")
  os.makedirs(out)
  meta = export_formats.write(gen, out, "diffusers", run_config=config, name="sana_student")
  return out, meta


def test_sana_pipeline_draws_the_generators_images(sana_student, exported):
  config, gen, _ = sana_student
  out, meta = exported
  assert sorted(os.listdir(out)) == ["README.md", "export.json", "model_index.json", "scheduler",
                                     "text_encoder", "tokenizer", "transformer", "vae"]
  card = open(os.path.join(out, "README.md")).read()
  assert 'SanaPipeline.from_pretrained("sana_student"' in card and "guidance_scale=1.0" in card
  assert "num_inference_steps=1" in card and "/tmp" not in card
  pipe = diffusers.SanaPipeline.from_pretrained(out)  # float32, the card's call
  assert pipe.vae.config.scaling_factor == pytest.approx(config.vae.scaling_factor)

  key = jax.random.PRNGKey(0)
  images = gen(key, PROMPTS)  # encoded by the run's Gemma-2, as SanaPipeline encodes them
  e = np.asarray(jax.random.normal(key, (len(PROMPTS),) + gen.shape, jnp.float32))
  latents = torch.from_numpy(e.transpose(0, 3, 1, 2).copy())

  def draw(prompts):
    with torch.no_grad():
      x = pipe(prompts, latents=latents, output_type="pt", **meta["call"]).images
    return x.numpy().transpose(0, 2, 3, 1) * 2.0 - 1.0  # the pipeline's [0, 1] -> ours [-1, 1]

  got = draw(PROMPTS)
  assert got.shape == images.shape and float(np.std(images)) > 0.05
  err = float(np.max(np.abs(got - images)))
  print(f"diffusers SanaPipeline round-trip max abs error (decoded images): {err:.3g}")
  assert err < 1e-4
  # The prompts reach the images: the same latents under the swapped prompts differ.
  assert float(np.max(np.abs(draw(PROMPTS[::-1]) - images))) > 1e-3


def test_the_exported_folder_is_accepted_as_a_teacher(sana_student, exported):
  """The reverse: convert/sana.load_sana (a teacher, or init_checkpoint) reads the pipeline
  folder; its v(e, 1 | c) is the student's u(e, 0, 1 | c)."""
  from hierdistill.convert import from_config
  from hierdistill.convert import sana as convert_sana
  config, gen, source = sana_student
  out, _ = exported
  teacher, params = convert_sana.load_sana(out)
  c = jax.tree.map(jnp.asarray, source.conditions_from_prompts(config, PROMPTS))
  e = jax.random.normal(jax.random.PRNGKey(1), (2,) + gen.shape)
  one = jnp.ones((2,))
  u = gen.model.apply({"params": gen.params}, e, 0 * one, one, c)
  v = teacher.apply({"params": params}, e, None, one, c)
  err = float(jnp.max(jnp.abs(u - v)))
  print(f"diffusers folder read back as a teacher: max abs error {err:.3g}")
  assert err < 1e-5
  # As config.teacher.init_checkpoint: the folder's weights file stands for the folder.
  weights = os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors")
  config = mjhq_sana.get_config("runlocal")
  config.teacher.init_checkpoint = weights
  model = registry.build(config.model).clone(interval_conditioning=False)
  loaded = from_config.load_teacher(config, model)
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x)
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for k, x in flat(params).items():
    np.testing.assert_array_equal(flat(loaded)[k], x, err_msg=k)


def test_missing_text_files_are_one_line(sana_student, tmp_path):
  config, gen, _ = sana_student
  with pytest.raises(ConfigError, match=r"--format=hierdistill does not hold a SANA run.*"
                                        r"use --format=diffusers"):
    export_formats.check_request(gen, "hierdistill", 1)
  config = config.copy_and_resolve_references()
  config.text_encoder.tokenizer = str(tmp_path / "nowhere" / "tokenizer.json")
  with pytest.raises(ConfigError, match=r"config\.text_encoder\.tokenizer=.*no such file") as e:
    export_formats.write(gen, str(tmp_path), "diffusers", run_config=config, name="x")
  assert "\n" not in str(e.value) and os.listdir(tmp_path) == []  # refused before writing


def test_a_run_with_published_folders_has_them_copied(sana_student, exported, tmp_path):
  """The branch a real run takes: config.vae.path and config.text_encoder.path are diffusers /
  transformers folders (here the first export's), copied as they are; the pipeline then draws
  the same images as the first export's."""
  config, gen, _ = sana_student
  first, meta = exported
  config = config.copy_and_resolve_references()
  config.vae.update(random_init=False, path=os.path.join(first, "vae"))
  config.text_encoder.update(random_init=False, path=os.path.join(first, "text_encoder"),
                             tokenizer=os.path.join(first, "tokenizer", "tokenizer.json"))
  out = str(tmp_path / "copied")
  os.makedirs(out)
  export_formats.write(gen, out, "diffusers", run_config=config, name="copied")
  for part in ("vae", "text_encoder", "tokenizer"):
    for name in os.listdir(os.path.join(first, part)):
      assert open(os.path.join(out, part, name), "rb").read() == open(
          os.path.join(first, part, name), "rb").read(), (part, name)
  index = json.load(open(os.path.join(out, "model_index.json")))
  assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
  h, w, c = gen.shape
  e = torch.randn(1, c, h, w)
  with torch.no_grad():
    a, b = (diffusers.SanaPipeline.from_pretrained(f)(PROMPTS[:1], latents=e, output_type="np",
                                                      **meta["call"]).images
            for f in (first, out))
  np.testing.assert_array_equal(a, b)
  config.vae.path = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=r"config\.vae\.path=.*is not a folder with config\.json"):
    export_formats.write(gen, str(tmp_path / "x"), "diffusers", run_config=config, name="x")
