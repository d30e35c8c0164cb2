"""ImageNet 256 pieces that need no download: the experiment config, missing-file errors, the
latent shards and their input pipeline, extraction from mock ImageNet, the Inception scorer,
and (slow) the whole runlocal chain."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits
from experiments import imagenet256
from hierdistill.config_checks import ConfigError, validate_config
from hierdistill.convert import dit as convert_dit
from hierdistill.convert import from_config
from hierdistill import encoding
from hierdistill import pipeline
from hierdistill import sharding
from hierdistill.data import imagenet_latents as il


def test_config_is_sit_xl2_on_sd_vae_latents():
  c = imagenet256.get_config()
  validate_config(c)
  m = c.model
  assert (m.input_size, m.in_channels, m.out_channels, m.num_classes) == (32, 4, 8, 1000)
  assert (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (1152, 28, 16, 2)
  for k, v in convert_dit.MODEL_FIELDS["sit"].items():
    assert m[k] == v
  assert c.vae.scaling_factor == 0.18215 and c.eval.num_samples == 50_000
  with pytest.raises(ValueError, match="unknown variant"):
    imagenet256.get_config("big")


@pytest.mark.parametrize("arg", [None, "lightningdit"])
def test_the_configured_mesh_shards_every_xl_weight_up_to_a_pod(arg):
  """(data -1, fsdp 64): 64 chips as one fsdp axis, 256 as 4 x 64; over 256 chips a fifth of
  the XL weights' bytes would stay whole on every chip."""
  c = imagenet256.get_config(arg)
  assert sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, 64) == (1, 64)
  assert sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, 256) == (4, 64)
  params = pipeline.Networks(c).abstract_params(
      (c.model.input_size, c.model.input_size, c.model.in_channels), student=True)
  assert sharding.unshardable_fraction(params, 64, c.sharding_rules) == 0.0
  assert sharding.unshardable_fraction(params, 256, c.sharding_rules) > 0.2


@pytest.mark.parametrize("key", ["teacher.init_checkpoint", "vae.path", "eval.inception_weights",
                                 "eval.reference_batch"])
def test_each_missing_file_names_its_key_and_where_published(tmp_path, key):
  c = imagenet256.get_config()
  # Every file present but `key`.
  for k in ("teacher.init_checkpoint", "vae.path", "eval.inception_weights",
            "eval.reference_batch"):
    block, name = k.split(".")
    path = tmp_path / name
    path.write_bytes(b"x")
    c[block][name] = "" if k == key else str(path)
  where = {"teacher.init_checkpoint": "SiT-XL-2-256x256.pt", "vae.path": "sd-vae-ft-ema",
           "eval.inception_weights": "pt_inception-2015-12-05",
           "eval.reference_batch": "VIRTUAL_imagenet256_labeled.npz"}[key]
  with pytest.raises(ConfigError, match=rf"^config\.{key}='': no such file; expected .*{where}"):
    from_config.check_files(c)


def _write_shards(tmp_path, n=10, shards=2, flips=True, shape=(2, 2, 4)):
  rng = np.random.default_rng(0)
  means = rng.standard_normal((n,) + shape).astype(np.float16)
  stds = (0.1 * rng.random((n,) + shape)).astype(np.float16)
  for k, (a, b) in enumerate(il.shard_ranges(n, shards)):
    w = il.ShardWriter(str(tmp_path / il.shard_name("train", k, shards)))
    for i in range(a, b):
      w.write(il.encode_record(means[i], stds[i], i % 7, -means[i] if flips else None,
                               stds[i] if flips else None))
    w.close()
  il.write_info(str(tmp_path), {"num_examples": n, "num_shards": shards, "latent_shape":
                                list(shape), "flips": flips, "num_classes": 1000})
  return means, stds


def test_latent_pipeline_order_resume_and_processes(tmp_path):
  means, _ = _write_shards(tmp_path)
  ds = il.open_latents(str(tmp_path))
  assert (ds.num_examples, ds.shape) == (10, (2, 2, 4))
  kw = dict(scaling_factor=0.5, sampling="mean", flip=False)
  pipe = il.LatentPipeline(ds, 4, seed=3, **kw)
  b = pipe.batch(5)
  idx = pipe.global_indices(5)
  np.testing.assert_allclose(b["x"], 0.5 * means[idx].astype(np.float32))
  np.testing.assert_array_equal(b["c"], idx % 7)
  # Two processes read the two halves of the same global batch, draws included.
  pipe = il.LatentPipeline(ds, 4, seed=3, scaling_factor=0.5, sampling="sample", flip=True)
  whole = pipe.batch(2)
  halves = [il.LatentPipeline(ds, 4, seed=3, scaling_factor=0.5, sampling="sample", flip=True,
                              process_index=p, process_count=2).batch(2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves]), whole["x"])
  # Resuming at step s reads what an uninterrupted run reads there (prefetch included).
  it = pipe.iterate(0)
  first = [next(it)["x"] for _ in range(4)]
  np.testing.assert_array_equal(next(pipe.iterate(3))["x"], first[3])
  # Flips pick the stored mirror (here -mean), about half of the time.
  signs = []
  plain = il.LatentPipeline(ds, 4, seed=3, scaling_factor=1.0, sampling="mean", flip=True)
  for step in range(20):
    x, i = plain.batch(step)["x"], plain.global_indices(step)
    signs += list(np.sign(np.sum(x * means[i].astype(np.float32), axis=(1, 2, 3))))
  assert 0.2 < np.mean(np.array(signs) < 0) < 0.8


def test_latents_errors_name_the_key(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.data\.latents_dir=.*extract_latents"):
    il.open_latents(str(tmp_path))
  _write_shards(tmp_path, flips=False)
  os.remove(tmp_path / il.shard_name("train", 1, 2))
  with pytest.raises(FileNotFoundError, match="1 of the 2 train shards"):
    il.open_latents(str(tmp_path))
  _write_shards(tmp_path, flips=False)
  with pytest.raises(ValueError, match=r"config\.data\.flip=True .* without flips"):
    il.LatentPipeline(il.open_latents(str(tmp_path)), 2, 0, scaling_factor=1.0, flip=True)


def test_adm_center_crop():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (600, 1000, 3), dtype=np.uint8)
  out = il.adm_center_crop(img, 256)
  assert out.shape == (256, 256, 3) and out.dtype == np.uint8
  flat = np.full((90, 40, 3), 77, np.uint8)  # upsampled: bicubic of a constant is constant
  np.testing.assert_array_equal(il.adm_center_crop(flat, 32), 77)
  # Left/right halves of a half-black image stay apart: the crop is centred.
  half = np.zeros((512, 1024, 3), np.uint8)
  half[:, 512:] = 255
  out = il.adm_center_crop(half, 256)
  assert out[:, :100].max() == 0 and out[:, -100:].min() == 255


def test_extract_mock_imagenet_matches_direct_encoding(tmp_path):
  c = imagenet256.get_config("runlocal")
  c.data.update(mock_num_examples=8, num_shards=2, extract_batch_size=8, image_size=16)
  c.vae.sizes.update(block_out_channels=(4, 8), norm_num_groups=4)
  out = str(tmp_path / "latents")
  result = encoding.extract_from_config(c, out, reference_size=8, log=lambda *_: None)
  assert result == {"written": 2, "skipped": 0}
  ds = il.open_latents(out)
  assert ds.num_examples == 8 and ds.shape == (8, 8, 4) and ds.info["flips"]
  recs = il.read_all(ds)
  ref = np.load(os.path.join(out, "reference.npz"))["arr_0"]
  # Mock data is regenerated identically: the reference images are the encoded crops.
  vae, params = from_config.load_vae(c)
  from hierdistill.models.vae import AutoencoderKL
  x = jnp.asarray(ref[:8], jnp.float32) / 127.5 - 1.0
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, jnp.concatenate([x, x[:, :, ::-1]]),
                                          method=AutoencoderKL.encode))
  mean, logvar = encode(params, x)
  np.testing.assert_allclose(recs["mean"], mean[:8], atol=2e-3, rtol=2e-3)
  np.testing.assert_allclose(recs["std"], np.exp(0.5 * logvar[:8]), atol=2e-3, rtol=2e-3)
  np.testing.assert_allclose(recs["flip_mean"], mean[8:], atol=2e-3, rtol=2e-3)
  # Rerunning skips complete shards.
  assert encoding.extract_from_config(c, out, log=lambda *_: None) == {"written": 0, "skipped": 2}


def test_scorer_reference_against_itself():
  from hierdistill import sharding as shard_lib
  from hierdistill.evaluation import imagenet as ev
  from hierdistill.evaluation import inception
  from hierdistill.models.vae import AutoencoderKL
  mesh = shard_lib.make_mesh(-1, 1)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
  net = inception.FIDInceptionV3(width=0.125)
  vae = AutoencoderKL(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4)
  vae_params = from_config.random_vae_params(vae)
  scorer = ev.ImageNetScorer(vae=vae, vae_params=vae_params, inception=net,
                             inception_params=inception.random_params(net),
                             reference={"images": images}, mesh=mesh, inception_size=75,
                             batch_size=16, random_inception=True, is_split_size=16)
  pool, logits = scorer.image_features(images)
  row = scorer.score(pool, logits)
  assert set(row) == {"FD-random-inception", "IS-random-inception", "precision", "recall"}
  assert row["FD-random-inception"] < 1e-6 and row["precision"] == row["recall"] == 1.0
  # Samples from a sampler that returns its noise, decoded by the VAE: a full row.
  row, grid = scorer.measure(lambda p, z, y: z, None, num_samples=20, latent_shape=(8, 8, 4),
                             num_classes=1000, key=jax.random.key(0), keep_images=5)
  assert grid.shape == (5, 16, 16, 3) and grid.dtype == np.uint8
  assert row["FD-random-inception"] > 0 and 0 <= row["precision"] <= 1
  np.testing.assert_array_equal(ev.to_uint8(jnp.array([-2.0, -1.0, 0.0, 0.999, 5.0])),
                                [0, 0, 128, 255, 255])


def test_the_imagenet_source_is_registered_and_the_chain_names_no_source():
  """The chain finds the ImageNet latents through the source registry; neither the chain nor
  the eval driver knows a data source by name (a new source touches neither)."""
  import inspect
  from hierdistill import pipeline, sources
  from hierdistill.evaluation import driver
  from hierdistill.sources import embedded
  from hierdistill.sources import imagenet as imagenet_source
  assert sources.source_class(imagenet256.get_config("runlocal").data.name) is (
      imagenet_source.ImageNetSource)
  assert sources.source_class(digits.get_config("tiny").data.name) is embedded.DigitsSource
  for module in (pipeline, driver):
    text = inspect.getsource(module)
    assert not [name for name in sources.NAMES if name in text], module.__name__
  assert pipeline.is_published_checkpoint("/m/SiT-XL-2-256x256.pt")
  assert pipeline.is_published_checkpoint("/m/tiny.safetensors")
  assert not pipeline.is_published_checkpoint("/run/teacher/checkpoints/4/export")
  assert not pipeline.is_published_checkpoint("")


def _imports_of(path: str) -> set:
  """Every hierdistill module a source file imports, at its top or inside a function."""
  import ast
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
  return {m for m in found if m.startswith("hierdistill")}


# (files, the packages they must not import, why): DESIGN.md's layers, which reach down only.
LAYER_RULES = (
    (("evaluation/", "generator.py", "export.py", "awd_view.py"), "hierdistill.stages",
     "a finished generator and the evaluation need no training code"),
    (("data/",), "hierdistill.models", "data readers know no network (encoding.py applies one)"),
)


def test_layers_import_nothing_above_them():
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hierdistill")
  files = sorted(os.path.relpath(os.path.join(d, f), root)
                 for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))
  broken = []
  for where, banned, why in LAYER_RULES:
    for rel in files:
      if rel.startswith(where):
        bad = [m for m in _imports_of(os.path.join(root, rel))
               if m == banned or m.startswith(banned + ".")]
        broken += [f"{rel} imports {m} ({why})" for m in sorted(bad)]
  assert not broken, broken


@pytest.mark.slow
def test_runlocal_runs_the_whole_chain(tmp_path):
  from hierdistill import pipeline
  c = imagenet256.get_config("runlocal")
  summary = pipeline.run(c, str(tmp_path / "run"))
  rows = summary["eval"]["rows"]
  assert [r["model"] for r in rows] == ["teacher (4 steps)", "stage 1 (TD) (1 step)",
                                        "stage 2 (HD) (1 step)"]
  assert all(np.isfinite(r["FD-random-inception"]) for r in rows)
  assert os.path.isfile(tmp_path / "run" / "eval" / "samples_stage_2_HD_1_step.png")
  # Rerun: every stage is skipped after its export restores, and the eval is not redone.
  again = pipeline.run(c, str(tmp_path / "run"))
  assert all(s["status"] == "finished earlier" for s in again["stages"].values())
  assert again["eval"]["rows"] == rows


@pytest.mark.slow
def test_chain_distils_an_imported_sit_file(tmp_path):
  """Stage 1 and eval from a published-layout SiT file (random weights, safetensors so that no
  torch is needed), as the real config runs from SiT-XL-2-256x256.pt."""
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  from hierdistill import pipeline
  c = imagenet256.get_config("runlocal")
  m = c.model
  layout = convert_dit.published_layout(
      depth=m.depth, hidden_size=m.hidden_size, patch_size=m.patch_size,
      in_channels=m.in_channels, out_channels=m.out_channels, num_classes=m.num_classes,
      input_size=m.input_size)
  from hierdistill.models.dit import sincos_pos_embed_2d
  rng = np.random.default_rng(0)
  sd = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in layout.items()}
  sd["pos_embed"] = sincos_pos_embed_2d(m.hidden_size, m.input_size // m.patch_size)[None]
  path = str(tmp_path / "SiT-tiny.safetensors")
  safetensors_numpy.save_file(sd, path)
  c.stages = ("trajectory", "eval")
  c.teacher.init_checkpoint = path
  summary = pipeline.run(c, str(tmp_path / "run"))
  assert [r["model"] for r in summary["eval"]["rows"]] == ["teacher (4 steps)",
                                                           "stage 1 (TD) (1 step)"]
  # The first stage-1 step starts from the teacher exactly: the loss is finite and non-trivial.
  assert np.isfinite(summary["stages"]["trajectory"]["final_metrics"]["loss"])
