"""Text-to-image training data (data/text_latents.py): both real-data sources write the same
shards; the reader is per-process, ordered by (seed, step) and resume-exact."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from hierdistill.data import imagenet_latents as il
from hierdistill.data import text_latents as tl
from hierdistill.text import sana_encoder

CAPTIONS = ["a red fox in the snow", "a blue car", "two cats on a sofa", "a bowl of soup",
            "a lighthouse at night", "a logo with a tree", "an old man smiling"]
SIZE, SCALE = 64, 0.41407
LATENT = (2, 2, 32)


@pytest.fixture(scope="module")
def encoder():
  return sana_encoder.random_encoder(CAPTIONS, use_instruction=False, max_sequence_length=12)


def fake_dcae(images):
  """A stand-in encoder (B, 64, 64, 3) uint8 -> (B, 2, 2, 32): block means, tiled."""
  x = images.astype(np.float32).reshape(len(images), 2, 32, 2, 32, 3).mean(axis=(2, 4)) / 128
  return np.tile(x, (1, 1, 1, 11))[..., :32] - 1.0


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairs")
  rng = np.random.default_rng(0)
  lines = []
  for i, cap in enumerate(CAPTIONS):
    os.makedirs(root / "imgs" / f"d{i % 2}", exist_ok=True)
    name = f"d{i % 2}/{i}.png"
    Image.fromarray(rng.integers(0, 256, (SIZE + 8 * i, SIZE, 3)).astype(np.uint8)).save(
        root / "imgs" / name)
    lines.append(json.dumps({"image": name, "caption": cap}))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return root


def _extract(image_set, encoder, out, num_shards=3):
  rows = tl.read_captions(str(image_set / "captions.jsonl"), "config.data.captions_file", True)
  return tl.extract_images(rows=rows, images_dir=str(image_set / "imgs"), image_size=SIZE,
                           encode_images=fake_dcae, encode_text=encoder, out_dir=str(out),
                           num_shards=num_shards, batch_size=4, info={"vae": "fake"},
                           latent_shape=LATENT, log=lambda *_: None)


def test_image_caption_extraction_round_trip_and_resume(image_set, encoder, tmp_path):
  out = tmp_path / "lat"
  assert _extract(image_set, encoder, out) == {"written": 3, "skipped": 0}
  ds = tl.open_text_latents(str(out))
  assert ds.num_examples == len(CAPTIONS) and ds.shape == LATENT
  assert ds.info["real_source"] == "images" and ds.info["crop"] == "adm_center_crop"
  recs = tl.read_all(ds)
  assert [r["caption"] for r in recs] == CAPTIONS
  enc = encoder(CAPTIONS)
  for r, emb, mask in zip(recs, enc["embeddings"], enc["mask"]):
    np.testing.assert_array_equal(r["mask"], mask)
    assert r["embeddings"].shape == (mask.sum(), encoder.width)  # padded rows not stored
    np.testing.assert_allclose(tl.expand_embeddings(r)[mask == 1], emb[mask == 1], rtol=1e-3,
                               atol=1e-3)
  first = il.adm_center_crop(np.asarray(Image.open(image_set / "imgs" / "d0/0.png")), SIZE)
  np.testing.assert_allclose(recs[0]["latent"], fake_dcae(first[None])[0], atol=1e-3)
  # Resume: a lost shard is rewritten alone, the same bytes as before.
  shard = il.shard_paths(str(out))[1]
  before = open(shard, "rb").read()
  os.remove(shard)
  assert _extract(image_set, encoder, out) == {"written": 1, "skipped": 2}
  assert open(shard, "rb").read() == before


def test_pipeline_is_per_process_ordered_and_resume_exact(image_set, encoder, tmp_path):
  out = tmp_path / "lat"
  _extract(image_set, encoder, out, num_shards=2)
  ds = tl.open_text_latents(str(out))
  one = tl.TextLatentPipeline(ds, 4, seed=3, scaling_factor=SCALE)
  b = one.batch(5)
  assert b["x"].shape == (4,) + LATENT and b["c"]["embeddings"].shape == (4, 12, encoder.width)
  assert b["c"]["mask"].dtype == np.int32 and b["x"].dtype == np.float32
  recs = tl.read_all(ds)
  idx = one.global_indices(5)
  np.testing.assert_allclose(b["x"], SCALE * np.stack([recs[i]["latent"] for i in idx]).astype(
      np.float32))
  # Resume: a new reader (a restarted run) gives the same batch at the same step.
  again = tl.TextLatentPipeline(ds, 4, seed=3, scaling_factor=SCALE)
  np.testing.assert_array_equal(again.batch(5)["x"], b["x"])
  it = again.iterate(5)
  np.testing.assert_array_equal(next(it)["c"]["embeddings"], b["c"]["embeddings"])
  # Two processes read disjoint halves of the same global batch.
  halves = [tl.TextLatentPipeline(ds, 4, seed=3, scaling_factor=SCALE, process_index=p,
                                  process_count=2).batch(5) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves]), b["x"])
  np.testing.assert_array_equal(np.concatenate([h["c"]["mask"] for h in halves]), b["c"]["mask"])
  other = tl.TextLatentPipeline(ds, 4, seed=4, scaling_factor=SCALE)
  assert not all(np.array_equal(other.global_indices(s), one.global_indices(s)) for s in range(3))


def test_teacher_reals_are_a_function_of_seed_and_index(encoder, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(CAPTIONS) + "\n")
  rows = tl.read_captions(str(prompts), "config.data.prompts_file", False)
  calls = []

  def sample(noise, c):  # a stand-in teacher: the noise moved by the caption's first token
    calls.append(len(noise))
    return 0.5 * noise + c["embeddings"][:, 0, :1, None, None].reshape(-1, 1, 1, 1)

  def make(out, shards):
    return tl.make_teacher_reals(rows=rows, sample=sample, encode_text=encoder,
                                 scaling_factor=SCALE, latent_shape=LATENT, seed=7,
                                 out_dir=str(out), num_shards=shards, batch_size=4,
                                 info={"teacher": "fake"}, log=lambda *_: None)

  make(tmp_path / "a", 2)
  make(tmp_path / "b", 3)
  assert set(calls) == {4}  # padded batches: one shape, one compile
  a = tl.read_all(tl.open_text_latents(str(tmp_path / "a")))
  b = tl.read_all(tl.open_text_latents(str(tmp_path / "b")))
  assert [r["caption"] for r in a] == CAPTIONS
  for i, (ra, rb) in enumerate(zip(a, b)):
    np.testing.assert_array_equal(ra["latent"], rb["latent"])  # not the sharding's doing
    first = tl.expand_embeddings(ra)[0, 0]
    want = (0.5 * tl.teacher_noise(7, i, LATENT) + first) / SCALE
    np.testing.assert_allclose(ra["latent"].astype(np.float32), want, rtol=2e-3, atol=2e-3)
  assert tl.open_text_latents(str(tmp_path / "a")).info["real_source"] == "teacher"


def test_errors_name_the_key(image_set, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.captions_file=.*JSONL"):
    tl.read_captions(str(tmp_path / "none.jsonl"), "config.data.captions_file", True)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"image": "a.png", "caption": "x"}\n{"caption": "no image"}\n')
  with pytest.raises(ValueError, match="line 2 lacks 'image' and 'caption'"):
    tl.read_captions(str(bad), "config.data.captions_file", True)
  rows = [{"image": "missing.png", "caption": "x"}]
  with pytest.raises(FileNotFoundError, match="no image missing.png"):
    tl.extract_images(rows=rows, images_dir=str(tmp_path), image_size=SIZE,
                      encode_images=fake_dcae, encode_text=None, out_dir=str(tmp_path / "o"),
                      num_shards=1, batch_size=2, info={}, latent_shape=LATENT)
  assert not il.shard_paths(str(tmp_path / "o"))  # no shard that looks finished
  with pytest.raises(FileNotFoundError, match="config.data.latents_dir=.*extract_t2i_latents"):
    tl.open_text_latents(str(tmp_path / "nothing"))
  il.write_info(str(tmp_path), {"num_shards": 0, "num_examples": 0, "latent_shape": [1]})
  with pytest.raises(ValueError, match="not t2i_latents"):
    tl.open_text_latents(str(tmp_path))
  assert tl.record_bytes(50, 2304, (32, 32, 32)) == 2 * 50 * 2304 + 65536 + 300


def test_encoding_in_chunks_changes_nothing_but_memory(encoder):
  """text_encoder.batch_size: 7 prompts in chunks of 3 (the last padded) give the embeddings of
  7 at once; each row is encoded alone."""
  chunked = sana_encoder.SanaTextEncoder(encoder.model, encoder.params, encoder.tokenizer,
                                         use_instruction=False, max_sequence_length=12,
                                         batch_size=3)
  whole, parts = encoder(CAPTIONS), chunked(CAPTIONS)
  assert parts["embeddings"].shape == whole["embeddings"].shape == (7, 12, encoder.width)
  # float32 matmuls of another batch shape: a few 1e-6 apart, a misplaced row O(1)
  np.testing.assert_allclose(parts["embeddings"], whole["embeddings"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(parts["mask"], whole["mask"])
