"""The Flax CLIP (models/clip.py), its importer, preprocessing and tokenizer against transformers.

A tiny random CLIPModel (2 + 2 layers, width 32, 32x32 images in 8x8 patches, vocab 100) is saved
as published (save_pretrained: config.json + model.safetensors) and imported; both towers'
projected embeddings and the score 100 cos must agree to float32 precision, for both ways
transformers finds the end-of-text token (argmax of the ids when eos_token_id is the legacy 2,
else the first eos_token_id).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill.convert import clip as convert_clip
from hierdistill.models.clip import (CLIP, CLIP_MEAN, CLIP_STD, CLIP_TINY, CLIP_VIT_L14,
                                     clip_score, preprocess_images, resized_shape)
from hierdistill.text import clip_prompts


def test_vit_l14_param_count_is_the_published_size():
  model = CLIP(**CLIP_VIT_L14)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 77), jnp.int32))["params"]
  count = lambda tree: sum(a.size for a in jax.tree.leaves(tree))
  # transformers' CLIPModel at the openai/clip-vit-large-patch14 config, logit_scale included.
  assert count(shapes) == 427_616_513
  assert count(shapes["vision_model"]) == 303_179_776
  assert count(shapes["text_model"]) == 123_060_480


def test_bad_inputs_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.clip\.path='/nope'.*clip-vit-large"):
    convert_clip.load_clip("/nope")
  with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*clip-vit-large-patch14"):
    clip_prompts.load_tokenizer(str(tmp_path))
  model = CLIP(**CLIP_TINY)
  with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
    model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 4), jnp.int32))


def _reference(transformers, torch, eos_token_id, seed=0):
  t = CLIP_TINY
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=t["vocab_size"], hidden_size=t["text_hidden_size"],
                       intermediate_size=t["text_intermediate_size"],
                       num_hidden_layers=t["text_layers"], num_attention_heads=t["text_heads"],
                       max_position_embeddings=t["max_text_length"], eos_token_id=eos_token_id,
                       bos_token_id=0, pad_token_id=1),
      vision_config=dict(hidden_size=t["vision_hidden_size"],
                         intermediate_size=t["vision_intermediate_size"],
                         num_hidden_layers=t["vision_layers"],
                         num_attention_heads=t["vision_heads"], image_size=t["image_size"],
                         patch_size=t["patch_size"]),
      projection_dim=t["projection_dim"])
  torch.manual_seed(seed)
  ref = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # LayerNorms away from (1, 0); the score scale at its published 100
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
    ref.logit_scale.fill_(float(np.log(100.0)))
  return ref


def _ids(eos_id, rng):
  """Rows of random tokens, the end-of-text id at different places, padding (0) after it."""
  ids = np.zeros((3, CLIP_TINY["max_text_length"]), np.int64)
  for row, end in enumerate((14, 6, 2)):
    ids[row, :end] = rng.integers(10, 90, end)  # neither end-of-text id (7, 99)
    ids[row, end] = eos_id
  return ids


def _pooled(out):
  return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("eos_config,eos_id", [(2, 99), (7, 7)])
def test_towers_and_score_match_transformers(tmp_path, eos_config, eos_id):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  ref = _reference(transformers, torch, eos_config)
  ref.save_pretrained(str(tmp_path / "clip"))
  model, params = convert_clip.load_clip(str(tmp_path / "clip"))
  assert model.eos_token_id == (None if eos_config == 2 else eos_config)
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
  ids = _ids(eos_id, rng)
  if eos_config != 2:
    ids[:, -1] = 98  # a larger id after the end: argmax would pick the wrong token
  with torch.no_grad():
    px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    want_image = _pooled(ref.get_image_features(pixel_values=px))
    want_text = _pooled(ref.get_text_features(input_ids=torch.from_numpy(ids)))
    want_logits = ref(input_ids=torch.from_numpy(ids), pixel_values=px).logits_per_image.numpy()
  image, text = jax.jit(lambda p, x, i: model.apply({"params": p}, x, i))(params, pixels, ids)
  np.testing.assert_allclose(image, want_image, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(text, want_text, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(clip_score(image, text), np.diag(want_logits), rtol=1e-4, atol=1e-3)


@pytest.mark.torch
def test_missing_and_unexpected_keys_name_the_file(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  ref = _reference(transformers, torch, 2)
  sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
  sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # as older files carry
  path = str(tmp_path / "model.safetensors")
  save_file(sd, path)
  convert_clip.load_clip(path, overrides=CLIP_TINY)  # the buffer is checked and dropped
  del sd["vision_model.encoder.layers.1.mlp.fc2.bias"]
  save_file(sd, path)
  with pytest.raises(ValueError, match=r"model\.safetensors lacks vision_model\.encoder\.layers"
                                       r"\.1\.mlp\.fc2\.bias.*clip-vit-large-patch14"):
    convert_clip.load_clip(path, overrides=CLIP_TINY)
  with pytest.raises(ValueError, match=r"unexpected key 'text_model\.encoder\.layers\.1\."):
    convert_clip.load_clip(path, overrides=dict(CLIP_TINY, text_layers=1))


@pytest.mark.torch
def test_preprocessing_matches_clip_image_processor():
  transformers = pytest.importorskip("transformers")
  processor_cls = getattr(transformers, "CLIPImageProcessorPil", None)
  processor = (processor_cls or transformers.CLIPImageProcessor)()
  rng = np.random.default_rng(0)
  level = 1.0 / 255.0 / min(CLIP_STD)  # one 8-bit level after normalisation
  for shape in ((300, 260), (231, 400), (180, 200), (224, 224)):
    image = rng.integers(0, 256, shape + (3,)).astype(np.uint8)
    want = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(jax.jit(preprocess_images)(image[None]))[0]
    assert got.shape == want.shape == (224, 224, 3)
    diff = np.abs(got - want)
    assert diff.max() <= 1.01 * level, shape  # PIL resamples in fixed point
    assert (diff > 1e-4).mean() < 0.005, shape


def test_preprocessing_of_a_square_image_is_resize_then_normalise():
  assert resized_shape(300, 260) == (258, 224) and resized_shape(231, 400) == (224, 387)
  image = np.full((2, 448, 448, 3), 128, np.uint8)
  out = np.asarray(preprocess_images(image))
  want = (128 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), atol=1e-5)
  floats = np.asarray(preprocess_images(image.astype(np.float32) / 255.0))
  np.testing.assert_allclose(floats, out, atol=1e-5)


def test_tokenizer_adds_start_end_truncates_and_pads(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, normalizers, pre_tokenizers
  words = ["a", "red", "fox", "in", "the", "snow"]
  vocab = {w: i for i, w in enumerate(words)}
  vocab.update({"<|startoftext|>": 55, "<|endoftext|>": 99, "[UNK]": 98})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  tok = clip_prompts.load_tokenizer(str(tmp_path))
  ids = clip_prompts.tokenize(tok, ["A Red Fox", "the snow " * 60])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0, :5], [55, 0, 1, 2, 99])
  assert (ids[0, 5:] == 0).all()
  assert ids[1, 0] == 55 and ids[1, 76] == 99 and (ids[1, 1:76] != 99).all()  # 75 kept
  with pytest.raises(ValueError, match="list of texts"):
    clip_prompts.tokenize(tok, "a fox")
