"""Where the AWD looks: the overlay of token weights on samples (evaluation/token_weights.py),
its numbers, and stage 2 writing it for an AWD head over a DiT and not for the mean-pooled head
(the runs of whole stages are `slow`; the fast tests check the same switch and writer)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits
from hierdistill import awd_view
from hierdistill import pipeline
from hierdistill import sharding as shard_lib
from hierdistill.config_checks import ConfigError
from hierdistill.evaluation import token_weights as tw
from hierdistill.models import dit as dit_lib
from hierdistill.stages import loop


def one_hot(n, t, k):
  w = np.zeros((n, t))
  w[:, k] = 1.0
  return w


def test_overlay_shape_and_legend():
  images = np.zeros((6, 8, 8, 1))
  weights = np.full((6, 16), 1 / 16)
  bare = tw.overlay_image(images, weights, 2, legend=False)
  # 3 tiles a row (ceil sqrt 6), 2 rows, 1 pixel of padding, upscaled 6x (tiles >= 48 px).
  assert bare.shape == ((2 * 9 + 1) * 6, (3 * 9 + 1) * 6, 3) and bare.dtype == np.uint8
  with_legend = tw.overlay_image(images, weights, 2)
  assert with_legend.shape[0] == bare.shape[0] + 30 and with_legend.shape[1] >= bare.shape[1]
  # Uniform weights tint nothing: the picture is the grey grid.
  assert np.all(bare[..., 0] == bare[..., 1]) and np.all(bare[..., 1] == bare[..., 2])


@pytest.mark.parametrize("k", [0, 5, 11, 15])
def test_weight_on_one_token_lights_exactly_its_patch(k):
  p, g = 2, 4
  picture = tw.overlay_image(np.zeros((1, 8, 8, 1)), one_hot(1, g * g, k), p, legend=False,
                             upscale=1)
  tile = picture[1:9, 1:9].astype(int)  # inside the 1-pixel padding
  red = tile[..., 0] > tile[..., 2]
  row, col = divmod(k, g)  # DiT's order: row-major over the (H / p, W / p) patch grid
  expected = np.zeros((8, 8), bool)
  expected[row * p:(row + 1) * p, col * p:(col + 1) * p] = True
  np.testing.assert_array_equal(red, expected)
  assert np.all(tile[~expected][:, 2] > tile[~expected][:, 0])  # the rest is below uniform


def test_token_order_is_the_dits():
  """token_map places token i where DiT's unpatchify (its own tokens -> pixels) puts it, and
  where DiT's patch embedding reads it from."""
  rng = np.random.default_rng(0)
  p, h, w = 2, 8, 8
  weights = rng.random((3, (h // p) * (w // p)))
  tokens = np.repeat(weights[..., None], p * p, axis=-1)  # each token's p x p pixels
  pixels = np.asarray(dit_lib.unpatchify(jnp.asarray(tokens), p, 1))[..., 0]
  np.testing.assert_allclose(tw.token_map(weights, (h, w), p), pixels)

  # The patch embedding of a real DiT: an image whose patch i holds the value i gives, through
  # the stride-p convolution with its kernel set to a patch mean, token i = i in the order the
  # DiT flattens them.
  model = dit_lib.DiT(input_size=8, in_channels=1, patch_size=p, hidden_size=8, depth=1,
                      num_heads=2, num_classes=10)
  z = jnp.asarray(tw.token_map(np.arange(16.0)[None], (h, w), p)[..., None], jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), z, None, jnp.ones((1,)),
                               jnp.zeros((1,), int))["params"]
  params = dict(params)
  params["x_embedder"] = {"kernel": jnp.full((p, p, 1, 8), 1.0 / (p * p)),
                          "bias": jnp.zeros((8,))}
  _, state = model.apply({"params": params}, z, None, jnp.ones((1,)), jnp.zeros((1,), int),
                         capture_intermediates=lambda m, _: m.name == "x_embedder")
  embedded = state["intermediates"]["x_embedder"]["__call__"][0]
  flat = np.asarray(embedded.reshape(1, 16, 8))[0, :, 0]  # DiT's reshape to (B, g * g, D)
  np.testing.assert_allclose(flat, np.arange(16.0), atol=1e-6)


def test_stats_effective_tokens_and_ink():
  # Ink (white, +1) in the left half of an 8x8 black image: tokens of columns 0 and 1.
  images = -np.ones((2, 8, 8, 1))
  images[:, :, :4] = 1.0
  uniform = np.full(16, 1 / 16)
  on_ink = np.zeros(16)
  on_ink[[0, 1]] = 0.5  # row 0, columns 0 and 1
  stats = tw.token_weight_stats(images, np.stack([uniform, on_ink]), 2)
  np.testing.assert_allclose(stats["effective_tokens"], [16.0, 2.0])
  np.testing.assert_allclose(stats["ink_tokens"], [0.5, 0.5])
  np.testing.assert_allclose(stats["ink_weight"], [0.5, 1.0])
  np.testing.assert_allclose(stats["max_weight_x_T"], [1.0, 8.0])


def test_wrong_shapes_are_named():
  with pytest.raises(ValueError, match=r"\(N, 16\)"):
    tw.overlay_image(np.zeros((2, 8, 8, 1)), np.ones((2, 15)) / 15, 2)
  with pytest.raises(ValueError, match="patch"):
    tw.token_map(np.ones((2, 16)), (8, 8), 3)


class ImageWriter:
  def __init__(self):
    self.images, self.scalars = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars.update(scalars)

  def write_images(self, step, images):
    self.images.update(images)

  def flush(self):
    pass


@pytest.mark.parametrize("overrides,shows", [
    ({}, True),
    ({"discriminator.pooling": "mean"}, False),
    ({"gen_adv_weight": 0.0, "disc_weight": 0.0}, False),  # no head trained: nothing to show
])
def test_only_a_trained_awd_over_a_dit_shows_token_weights(overrides, shows):
  c = digits.get_config("tiny")
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = c.distribution[node] if path else c.distribution
    target[path[0] if path else node] = value
  stage = pipeline.build_stage("distribution", c, pipeline.Networks(c))
  assert stage.shows_token_weights is shows


def test_the_toy_mlp_shows_no_token_weights():
  from experiments import toy2d
  c = toy2d.get_config("tiny")
  assert not pipeline.build_stage("distribution", c, pipeline.Networks(c)).shows_token_weights


def test_the_loop_writes_the_view_of_a_fresh_head(tmp_path):
  """A new AWD head's query is zero, so its weights are exactly uniform: the view says so, in
  the PNG's JSON, in TensorBoard's scalars and image, and changes nothing in the state."""
  c = digits.get_config("tiny")
  nets = pipeline.Networks(c)
  stage = pipeline.build_stage("distribution", c, nets)
  x = jnp.zeros((1, 8, 8, 1))
  t = jnp.ones((1,))
  y = jnp.zeros((1,), jnp.int32)
  teacher = jax.jit(nets.teacher.init)(jax.random.PRNGKey(1), x, None, t, y)["params"]
  student = jax.jit(nets.student.init)(jax.random.PRNGKey(2), x, t, t, y)["params"]
  state = jax.jit(stage.init)(jax.random.PRNGKey(3), x, y,
                              {"generator": student, "teacher": teacher})
  rng_before = np.asarray(state.rng)
  images = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
  writer = ImageWriter()
  loop._write_token_view(stage, state, {"teacher": teacher}, images, jnp.arange(5),
                         config=c, mesh=shard_lib.make_mesh(1, 1, devices=jax.devices()[:1]),
                         workdir=str(tmp_path), step=7, writer=writer)
  png = tmp_path / "distribution" / "awd_weights_step7.png"
  assert png.exists() and writer.images["distribution/awd_weights"].shape[0] == 1
  with open(tmp_path / "distribution" / "awd_weights_step7.json") as f:
    view = json.load(f)
  np.testing.assert_allclose(view["token_weights"], np.full((5, 16), 1 / 16), rtol=1e-5)
  assert writer.scalars["distribution/grid_awd_effective_tokens"] == pytest.approx(16, rel=1e-5)
  np.testing.assert_array_equal(np.asarray(state.rng), rng_before)


@pytest.fixture(scope="module")
def stage2_runs(tmp_path_factory):
  """A tiny teacher and stage 2 with the AWD, then stage 2 again with the mean-pooled head.

  Stage 2 starts from the teacher (the DMD-only ablation): stage 1 changes nothing here, and
  leaving it out saves a compile."""
  root = tmp_path_factory.mktemp("awd_view")
  data_dir = str(root / "tfds")

  def config(pooling):
    c = digits.get_config("tiny")
    c.data.data_dir = data_dir
    c.stages = ("teacher", "distribution") if pooling == "awd" else ("distribution",)
    for stage in (c.teacher, c.trajectory, c.distribution):
      stage.num_steps = 2
    c.distribution.init_from = "teacher"
    c.distribution.discriminator.pooling = pooling
    return c

  runs = {}
  for pooling in ("awd", "mean"):
    workdir = str(root / pooling)
    if pooling == "mean":  # the same teacher, trained once
      shutil.copytree(os.path.join(runs["awd"][0], "teacher"), os.path.join(workdir, "teacher"))
    writer = ImageWriter()
    pipeline.run(config(pooling), workdir, devices=jax.devices()[:1], writer=writer)
    runs[pooling] = (workdir, writer)
  return runs


@pytest.mark.slow
def test_stage2_writes_the_overlay_for_the_awd_only(stage2_runs):
  workdir, writer = stage2_runs["awd"]
  png = os.path.join(workdir, "distribution", "awd_weights_step2.png")
  assert os.path.getsize(png) > 0
  assert writer.images["distribution/awd_weights"].shape[-1] == 3
  with open(png[:-4] + ".json") as f:
    view = json.load(f)
  weights = np.asarray(view["token_weights"])
  assert weights.shape == (digits.get_config("tiny").sample.grid_size, 16)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  assert 1.0 <= writer.scalars["distribution/grid_awd_effective_tokens"] <= 16.0
  assert 0.0 <= writer.scalars["distribution/grid_awd_ink_weight"] <= 1.0

  workdir, writer = stage2_runs["mean"]
  assert os.path.exists(os.path.join(workdir, "distribution", "samples_step2.png"))
  assert not [f for f in os.listdir(os.path.join(workdir, "distribution"))
              if f.startswith("awd_weights")]
  assert "distribution/awd_weights" not in writer.images


@pytest.mark.slow
def test_render_from_a_finished_run_matches_the_loops_view(stage2_runs, tmp_path):
  workdir, _ = stage2_runs["awd"]
  picture, means = awd_view.render_awd_overlay(workdir, str(tmp_path / "again.png"))
  with open(os.path.join(workdir, "distribution", "awd_weights_step2.json")) as f:
    view = json.load(f)
  with open(tmp_path / "again.json") as f:
    again = json.load(f)
  # Restored from the last checkpoint, the same grid and view noise: the loop's weights.
  np.testing.assert_allclose(again["token_weights"], view["token_weights"], atol=1e-6)
  assert picture.ndim == 3 and set(means) >= {"effective_tokens", "ink_weight"}
  picture, _ = awd_view.render_awd_overlay(workdir, str(tmp_path / "six.png"), num_samples=6)
  assert os.path.getsize(tmp_path / "six.png") > 0
  with pytest.raises(ConfigError, match="pooling='mean'"):
    awd_view.render_awd_overlay(stage2_runs["mean"][0], str(tmp_path / "none.png"))
