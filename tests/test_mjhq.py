"""MJHQ-30K evaluation (evaluation/mjhq.py) on a mock MJHQ folder, tiny random Inception and
CLIP: prompts and categories, resizing, cached reference statistics, FID and CLIP columns."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hierdistill import sharding as shard_lib
from hierdistill.evaluation import frechet
from hierdistill.evaluation import inception as inception_lib
from hierdistill.evaluation import mjhq
from hierdistill.models import clip as clip_lib

CATS = ("animals", "food", "logo")
PER_CAT = 6
SIZE = 32  # the FID resolution of the test (512 in the paper's protocol)
GEN = 48  # the mock images' and samples' size (1024 in MJHQ)


def _image(rng):
  """A smooth random image (so resizing keeps it recognisable), uint8 (GEN, GEN, 3)."""
  low = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(low).resize((GEN, GEN), Image.BICUBIC))


@pytest.fixture(scope="module")
def mock_mjhq(tmp_path_factory):
  root = tmp_path_factory.mktemp("mjhq")
  rng = np.random.default_rng(0)
  meta, images = {}, {}
  for c, cat in enumerate(CATS):
    os.makedirs(root / "imgs" / cat)
    for i in range(PER_CAT):
      image_id = f"{c:02d}{i:04x}deadbeef"
      meta[image_id] = {"category": cat, "prompt": f"a {cat} picture number {i}"}
      images[meta[image_id]["prompt"]] = _image(rng)
      Image.fromarray(images[meta[image_id]["prompt"]]).save(
          root / "imgs" / cat / f"{image_id}.jpg", quality=100)
  (root / "meta_data.json").write_text(json.dumps(meta))
  return root, images


def test_meta_and_prompt_selection(mock_mjhq, tmp_path):
  root, _ = mock_mjhq
  prompts = mjhq.read_meta(str(root / "meta_data.json"))
  assert len(prompts) == len(CATS) * PER_CAT
  assert [p.category for p in prompts] == sorted(p.category for p in prompts)
  picked = mjhq.select_prompts(prompts, 7)
  assert [p.category for p in picked] == list(CATS) * 2 + [CATS[0]]  # categories in turn
  assert mjhq.select_prompts(prompts, len(prompts)) == prompts
  with pytest.raises(ValueError, match="num_samples=19.*18 prompts"):
    mjhq.select_prompts(prompts, 19)
  with pytest.raises(FileNotFoundError, match="config.eval.mjhq_meta=.*MJHQ-30K"):
    mjhq.read_meta(str(tmp_path / "nope.json"))
  (tmp_path / "bad.json").write_text(json.dumps({"x": {"prompt": "p"}}))
  with pytest.raises(ValueError, match="'x' lacks a 'category'"):
    mjhq.read_meta(str(tmp_path / "bad.json"))


def test_resize_center_crop_is_torchvision_resize_then_crop():
  rng = np.random.default_rng(1)
  tall = rng.integers(0, 256, (64, 48, 3)).astype(np.uint8)
  out = mjhq.resize_center_crop(tall, 32)
  # Resize(32): shorter side 48 -> 32, longer int(32 * 64 / 48) = 42; crop rows round(5) = 5.
  ref = np.asarray(Image.fromarray(tall).resize((32, 42), Image.BILINEAR))[5:37]
  np.testing.assert_array_equal(out, ref)
  square = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
  np.testing.assert_array_equal(mjhq.resize_center_crop(square, 32), square)


def _scorer(random_clip_seed=0):
  mesh = shard_lib.make_mesh(-1, 1)
  inception = inception_lib.FIDInceptionV3(width=0.125)
  clip = clip_lib.CLIP(**clip_lib.CLIP_TINY)
  clip_params = clip.init(jax.random.PRNGKey(random_clip_seed), jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1, 16), jnp.int32))["params"]
  tokenize = lambda texts: np.stack([np.asarray(
      [1] + [3 + (ord(ch) % 90) for ch in t[:13]] + [99] + [0] * (15 - min(len(t), 13)),
      np.int32)[:16] for t in texts])
  return mjhq.MJHQScorer(
      decode=lambda z: z, encode_prompts=None, inception=inception,
      inception_params=inception_lib.random_params(inception), clip=clip,
      clip_params=clip_params, clip_tokenize=tokenize, mesh=mesh, size=SIZE, batch_size=8,
      random_features=True, inception_size=75), clip, clip_params, tokenize


def test_reference_cache_and_scores(mock_mjhq, tmp_path):
  root, images = mock_mjhq
  prompts = mjhq.read_meta(str(root / "meta_data.json"))
  scorer, clip, clip_params, tokenize = _scorer()
  cache = str(tmp_path / "ref.npz")
  made_by = {"images": "mock", "feature_net": "random"}
  stats, counts = scorer.reference_statistics(prompts, str(root / "imgs"), cache, made_by)
  assert counts == {"all": 18, **{c: PER_CAT for c in CATS}}
  # Cached: a second call reads no image (an empty images dir still works) and agrees.
  again, _ = scorer.reference_statistics(prompts, str(tmp_path / "empty"), cache, made_by)
  np.testing.assert_array_equal(again["all"][1], stats["all"][1])
  with pytest.raises(ValueError, match="other settings.*images"):
    scorer.reference_statistics(prompts, "", cache, {**made_by, "images": "elsewhere"})
  with pytest.raises(FileNotFoundError, match="config.eval.mjhq_images: no image"):
    scorer.reference_statistics(prompts, str(tmp_path / "empty"), str(tmp_path / "r2.npz"),
                                made_by)

  # A "model" whose samples are the reference images themselves (after the JPEG round trip):
  # FD 0 overall and per category, and the CLIP column is the score of those images.
  on_disk = {p.prompt: mjhq.load_image(mjhq.image_path(str(root / "imgs"), p), "k")
             for p in prompts}
  scorer.encode_prompts = lambda texts: {
      "x": np.stack([on_disk[t] for t in texts]).astype(np.float32) / 127.5 - 1.0}
  sample_fn = lambda params, noise, c: c["x"] + 0.0 * noise[..., :1]
  row, kept = scorer.measure(sample_fn, None, prompts=prompts, latent_shape=(GEN, GEN, 3),
                             key=jax.random.PRNGKey(0), reference=stats, keep_images=5)
  assert kept.shape == (5, GEN, GEN, 3) and kept.dtype == np.uint8
  assert abs(row["FD-random-inception"]) < 1e-4, row
  for cat in CATS:
    assert abs(row[f"FD-random-inception/{cat}"]) < 1e-4, row
  texts = [p.prompt for p in prompts]
  pix = clip_lib.preprocess_images(jnp.asarray(np.stack([on_disk[t] for t in texts])), 32)
  ref = clip_lib.clip_score(clip.apply({"params": clip_params}, pix, method="encode_image"),
                            clip.apply({"params": clip_params}, jnp.asarray(tokenize(texts)),
                                       method="encode_text"))
  np.testing.assert_allclose(row["CLIP-random"], float(jnp.mean(ref)), rtol=1e-4)
  np.testing.assert_allclose(row["CLIP-random/food"], float(jnp.mean(ref[6:12])), rtol=1e-4)

  # Other images give a positive distance.
  scorer.encode_prompts = lambda texts: {"x": -np.ones((len(texts), GEN, GEN, 3), np.float32)
                                         + 0.1 * np.arange(len(texts))[:, None, None, None]}
  row, _ = scorer.measure(sample_fn, None, prompts=prompts, latent_shape=(GEN, GEN, 3),
                          key=jax.random.PRNGKey(0), reference=stats)
  assert row["FD-random-inception"] > 0.05

  mjhq.save_prompt_grid(kept, prompts, str(tmp_path / "grid.png"), thumbnail=32)
  assert Image.open(tmp_path / "grid.png").size[1] >= 5 * 32


def test_category_statistics_match_frechet():
  rng = np.random.default_rng(0)
  f = rng.standard_normal((12, 4))
  stats = mjhq.category_statistics(f, ["a"] * 6 + ["b"] * 5 + ["c"])
  assert set(stats) == {"all", "a", "b"}  # one sample: no covariance
  np.testing.assert_allclose(stats["b"][1], frechet.feature_statistics(f[6:11])[1])
