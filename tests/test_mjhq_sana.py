"""experiments/mjhq_sana.py and its data source (sources/mjhq.py): variants, the file checks
before anything compiles, the SANA teacher import, a fast smoke test of the mock source, and
(slow) the whole runlocal chain with the MJHQ evaluation."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import mjhq_sana
from hierdistill import conditions as cond_lib
from hierdistill import pipeline
from hierdistill import sharding
from hierdistill.config_checks import ConfigError
from hierdistill.sources import mjhq as source_lib


def test_variants_and_defaults():
  c = mjhq_sana.get_config()
  assert (c.model.depth, c.model.hidden_size, c.data.image_size) == (20, 2240, 1024)
  assert c.model.feature_layers == (2, 8, 14, 19)
  small = mjhq_sana.get_config("0.6B,512")
  assert (small.model.depth, small.model.num_heads, small.data.image_size) == (28, 36, 512)
  assert small.name == "mjhq_sana_0.6B_512"
  assert source_lib.T2ISource.example_shape(c) == (32, 32, 32)  # DC-AE f32c32 latents
  assert source_lib.T2ISource.example_shape(small) == (16, 16, 32)
  assert source_lib.T2ISource.example_prompts(c) == tuple(c.sample.grid_prompts)
  s = c.sample
  assert (s.teacher_method, s.teacher_steps, s.cfg_scale, s.shift) == ("dpm++2m", 20, 4.5, 3.0)
  assert c.eval.num_samples == 30_000 and c.eval.size == 512 and c.data.teacher_steps == 50
  with pytest.raises(ValueError, match="unknown variant '2K'"):
    mjhq_sana.get_config("2K")


@pytest.mark.parametrize("size", ["0.6B", "1.6B"])
def test_the_configured_mesh_shards_sanas_weights_on_every_slice(size):
  """mjhq_sana.py's mesh (data -1, fsdp 64): on 16 chips all of them, on a v5e 16x16 (256) a
  hybrid 4 x 64 that shards every large weight of SANA, where one fsdp axis of 256 would shard
  almost nothing (256 divides none of its widths); its rules keep the depthwise kernels whole."""
  c = mjhq_sana.get_config(size)
  assert sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, 16) == (1, 16)
  assert sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, 256) == (4, 64)
  null = cond_lib.Text(np.zeros((300, c.model.caption_channels), np.float32),
                       np.ones(300, np.int32))
  nets = pipeline.Networks(c, null)
  shape = source_lib.T2ISource.example_shape(c)
  for student in (False, True):
    params = nets.abstract_params(shape, student=student)
    assert sharding.unshardable_fraction(params, 64, c.sharding_rules) < 0.01
    assert sharding.unshardable_fraction(params, 256, c.sharding_rules) > 0.9
  # The 3x3 depthwise kernels stay whole (their activations are what a sharded kernel moves);
  # the 1x1 convs beside them are sharded.
  mesh = sharding.make_mesh(1, 8, devices=jax.devices()[:8])
  specs = {sharding.path_str(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(
      sharding.state_shardings(params, mesh, c.sharding_rules))}
  depthwise = [k for k in specs if k.endswith("conv_depth/kernel")]
  assert depthwise and all(specs[k] == P() for k in depthwise)
  assert all("fsdp" in specs[k] for k in specs if k.endswith("conv_inverted/kernel"))


def test_every_missing_file_is_one_line_naming_key_and_where_published(tmp_path):
  c = mjhq_sana.get_config()
  keys = [k for k, _, _ in source_lib.required_files(c)]
  assert keys == ["config.teacher.init_checkpoint", "config.vae.path",
                  "config.text_encoder.path", "config.text_encoder.tokenizer",
                  "config.data.latents_dir", "config.eval.mjhq_meta", "config.eval.mjhq_images",
                  "config.eval.inception_weights", "config.clip.path", "config.clip.tokenizer"]
  with pytest.raises(ConfigError) as e:
    source_lib.check_files(c)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("config.teacher.init_checkpoint=''")
  assert "Sana_600M_512px" in msg
  # Fill the files one by one: each next missing one is named in turn.
  seen = []
  for key, _, _ in source_lib.required_files(c):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
      source_lib.check_files(c)
    seen.append(key)
    path = tmp_path / key.replace(".", "_")
    path.mkdir()
    block, name = key.split(".")[1:]
    if name == "latents_dir":
      (path / "info.json").write_text("{}")
    c[block][name] = str(path)
  source_lib.check_files(c)
  assert len(seen) == len(keys)


def test_teacher_of_another_size_is_refused(tmp_path):
  from hierdistill import models as models_lib
  from hierdistill.convert import from_config
  from hierdistill.data import t2i_mock
  c = mjhq_sana.get_config("runlocal")
  model = models_lib.build(c.model).clone(interval_conditioning=False)
  path = t2i_mock.write_sana_folder(str(tmp_path / "transformer"), model,
                                    t2i_mock.random_sana_teacher(model))
  c.teacher.init_checkpoint = path  # the safetensors file stands for its folder
  params = from_config.load_teacher(c, model)
  assert params["blocks_1"]["attn2"]["to_q"]["kernel"].shape == (32, 32)
  c.model.depth = 3
  with pytest.raises(ValueError, match="depth=2 but config.model.depth=3"):
    from_config.load_teacher(c, models_lib.build(c.model).clone(interval_conditioning=False))


def test_mock_source_smoke(tmp_path):
  """The runlocal source opens (mock files, DC-AE extraction, Gemma-2 null), and its pipeline
  gives scaled latents with their text condition."""
  from hierdistill import sharding as shard_lib
  c = mjhq_sana.get_config("runlocal")
  c.data.update(mock_num_examples=8, mock_mjhq_per_category=1, extract_batch_size=4)
  src = source_lib.T2ISource(c, str(tmp_path), shard_lib.make_mesh(-1, 1))
  assert src.shape == (8, 8, 4) and src.examples == 8
  assert src.conditions.length == 24 and src.conditions.width == 64
  assert int(src.conditions.null_mask.sum()) == 1  # the empty prompt: BOS only
  assert c.teacher.init_checkpoint.endswith("transformer/diffusion_pytorch_model.safetensors")
  src.check_model()
  batch = src.make_pipeline(4, seed=0).batch(0)
  assert batch["x"].shape == (4, 8, 8, 4) and batch["c"]["embeddings"].shape == (4, 24, 64)
  assert batch["c"]["mask"].sum(axis=1).min() > 1  # captions, not the empty prompt
  grid = src.grid_conditions(8)
  np.testing.assert_array_equal(grid["mask"][0], grid["mask"][3])  # a row shares its prompt
  assert src.grid_prompts(8)[4] == c.sample.grid_prompts[1]
  # The captions were encoded with 24 tokens: another length is refused before any compile.
  c.text_encoder.max_sequence_length = 16
  with pytest.raises(ConfigError, match="max_sequence_length=16 but the captions"):
    source_lib.T2ISource(c, str(tmp_path), shard_lib.make_mesh(-1, 1))


def test_teacher_reals_command(tmp_path):
  """extract_from_config with real_source='teacher' (launch/extract_t2i_latents.py): the
  imported teacher samples each training prompt with config.sample's solver and CFG; the shards
  hold its latents (unscaled) and the prompts, in order."""
  from hierdistill.data import text_latents as tl
  c = mjhq_sana.get_config("runlocal")
  c.data.update(mock_num_examples=4, mock_mjhq_per_category=1, teacher_steps=2, num_shards=1,
                extract_batch_size=4)
  source_lib.prepare_mock(c, str(tmp_path))  # the tiny teacher, tokenizers
  prompts = ["a red circle on a white background", "a blue bar on a black background"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  c.data.update(real_source="teacher", prompts_file=str(tmp_path / "prompts.txt"))
  out = str(tmp_path / "reals")
  assert source_lib.extract_from_config(c, out, log=lambda *_: None)["written"] == 1
  ds = tl.open_text_latents(out)
  assert ds.info["real_source"] == "teacher" and ds.shape == (8, 8, 4)
  assert ds.info["sampler"] == "dpm++2m, 2 steps, CFG 4.5, shift 3.0"
  recs = tl.read_all(ds)
  assert [r["caption"] for r in recs] == prompts
  assert all(np.isfinite(r["latent"].astype(np.float32)).all() for r in recs)
  c.data.real_source = "video"
  with pytest.raises(ConfigError, match="real_source='video'"):
    source_lib.extract_from_config(c, out)


@pytest.mark.slow
def test_runlocal_chain_and_mjhq_eval(tmp_path):
  """experiments/mjhq_sana.py:runlocal end to end: stage 1, stage 2 and the MJHQ evaluation
  (teacher, stage-1 and stage-2 rows, FD and CLIP overall and per category)."""
  from hierdistill import pipeline
  c = mjhq_sana.get_config("runlocal")
  workdir = str(tmp_path / "run")
  pipeline.run(c, workdir)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  rows = {r["model"]: r for r in metrics["rows"]}
  assert set(rows) == {"teacher (4 steps)", "stage 1 (TD) (1 step)", "stage 2 (HD) (1 step)"}
  for row in rows.values():
    assert np.isfinite(row["FD-random-inception"]) and np.isfinite(row["CLIP-random"])
    assert "FD-random-inception/logo" in row and "CLIP-random/vehicles" in row
  assert rows["teacher (4 steps)"]["nfe"] == 8  # 4 Flow-DPM-Solver steps with CFG
  assert "NOT FID" in metrics["feature_nets"] and metrics["num_samples"] == 20
  assert os.path.isfile(os.path.join(workdir, "eval", "mjhq_reference_32px.npz"))
  assert os.path.isfile(os.path.join(workdir, "distribution", "samples_step4.png"))
