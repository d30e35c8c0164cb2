"""The Flax Gemma-2 encoder (models/gemma2.py) and its importer against transformers' Gemma2Model.

A tiny random Gemma-2 (4 layers, width 64, 4 query / 2 kv heads of 16, window 4 < the sequence,
soft-cap 5) is saved the way the published checkpoints are (save_pretrained of a CausalLM:
config.json + sharded safetensors with an index; also one file in the bare Gemma2Model layout
with a stray lm_head) and imported; last hidden states must agree on the real tokens of a
right-padded batch.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill.convert import gemma2 as convert_gemma2
from hierdistill.models.gemma2 import GEMMA2_2B, GEMMA2_TINY, SLIDING, Gemma2Encoder

LENGTHS = (12, 7, 3)  # right padding up to 12; longer than the window (4) on purpose


def test_2b_param_count_is_the_published_size():
  model = Gemma2Encoder(**GEMMA2_2B)
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids, ids)
  count = sum(a.size for a in jax.tree.leaves(shapes))
  embedding = 256000 * 2304
  # Gemma2Model without the LM head (tied to the embedding in Gemma, so no extra weights):
  # 26 layers x (attention 14,155,776 + MLP 63,700,992 + 4 norms 9,216) + final norm + embedding.
  assert count == 2_614_341_888
  assert count - embedding == 2_024_517_888
  assert model.resolved_layer_types()[:3] == (SLIDING, "full_attention", SLIDING)


def test_bad_inputs_and_paths_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.text_encoder\.path='/nope'.*gemma-2-2b-it"):
    convert_gemma2.load_gemma2("/nope")
  with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor .*gemma-2-2b-it"):
    convert_gemma2.load_gemma2(str(tmp_path))
  (tmp_path / "model.safetensors.index.json").write_text(
      '{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}')
  with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors, listed in .*"
                                              r"download every shard"):
    convert_gemma2.load_gemma2(str(tmp_path))
  model = Gemma2Encoder(**GEMMA2_TINY, dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"same shape \(B, L\)"):
    model.init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, GEMMA2_TINY["vocab_size"], (len(LENGTHS), max(LENGTHS))).astype(np.int32)
  mask = (np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  return np.where(mask > 0, ids, 0).astype(np.int32), mask


def _reference(transformers, torch, seed=0):
  t = GEMMA2_TINY
  config = transformers.Gemma2Config(
      vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
      intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_layers"],
      num_attention_heads=t["num_heads"], num_key_value_heads=t["num_kv_heads"],
      head_dim=t["head_dim"], query_pre_attn_scalar=t["query_pre_attn_scalar"],
      attn_logit_softcapping=t["attn_logit_softcap"], sliding_window=t["sliding_window"],
      max_position_embeddings=64, pad_token_id=0, attn_implementation="eager")
  torch.manual_seed(seed)
  ref = transformers.Gemma2ForCausalLM(config).eval()
  with torch.no_grad():  # norms away from their zero init; logits large enough to be capped
    for name, p in ref.named_parameters():
      p.copy_(0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 0.2)
  return ref


def _compare(torch, ref, model, params):
  ids, mask = _inputs()
  with torch.no_grad():
    want = ref.get_decoder()(input_ids=torch.from_numpy(ids).long(),
                             attention_mask=torch.from_numpy(mask).long())[0].numpy()
  got = np.asarray(jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(params, ids, mask))
  assert got.shape == want.shape == (len(LENGTHS), max(LENGTHS), GEMMA2_TINY["hidden_size"])
  real = mask > 0
  assert float(np.std(want[real])) > 0.1
  np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
  return got


@pytest.mark.torch
def test_sharded_causal_lm_checkpoint_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  ref = _reference(transformers, torch)
  folder = tmp_path / "gemma"
  ref.save_pretrained(str(folder), max_shard_size="100KB")  # as published: index + shards
  assert (folder / convert_gemma2.INDEX_FILE).is_file()
  model, params = convert_gemma2.load_gemma2(str(folder), dtype=np.float32,
                                             overrides=dict(dtype=jnp.float32))
  assert model.num_layers == 4 and model.sliding_window == 4 and model.attn_logit_softcap == 5.0
  got = _compare(torch, ref, model, params)

  # The window, which layers it is on, and the cap all matter here: changing any moves the output.
  odd_sliding = tuple(reversed(model.resolved_layer_types()))
  for change in (dict(sliding_window=None), dict(layer_types=odd_sliding),
                 dict(attn_logit_softcap=None)):
    other = model.clone(**change)
    moved = np.asarray(other.apply({"params": params}, *_inputs()))
    assert np.abs(moved - got)[_inputs()[1] > 0].max() > 1e-2, change


@pytest.mark.torch
def test_bare_model_file_with_lm_head_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  ref = _reference(transformers, torch, seed=1)
  sd = {k: v.contiguous() for k, v in ref.get_decoder().state_dict().items()}  # no "model."
  sd["lm_head.weight"] = torch.randn(GEMMA2_TINY["vocab_size"], GEMMA2_TINY["hidden_size"])
  path = str(tmp_path / "bare.safetensors")
  save_file(sd, path)
  model, params = convert_gemma2.load_gemma2(
      path, dtype=np.float32, overrides=dict(GEMMA2_TINY, dtype=jnp.float32))
  _compare(torch, ref, model, params)

  del sd["layers.2.mlp.up_proj.weight"]
  save_file(sd, path)
  with pytest.raises(ValueError, match=r"bare\.safetensors lacks model\.layers\.2\.mlp\.up_proj"
                                       r"\.weight.*gemma-2-2b-it"):
    convert_gemma2.load_gemma2(path, dtype=np.float32, overrides=GEMMA2_TINY)
  with pytest.raises(ValueError, match=r"unexpected key 'layers\.3\..*bare\.safetensors"):
    convert_gemma2.load_gemma2(path, dtype=np.float32, overrides=dict(GEMMA2_TINY, num_layers=3))


def test_bfloat16_encoder_runs_jitted_close_to_float32():
  ids, mask = _inputs()
  f32 = Gemma2Encoder(**GEMMA2_TINY, dtype=jnp.float32)
  params = f32.init(jax.random.key(0), ids, mask)["params"]
  bf16 = f32.clone(dtype=jnp.bfloat16)
  out32 = f32.apply({"params": params}, ids, mask)
  out16 = jax.jit(lambda p: bf16.apply({"params": p}, ids, mask))(params)
  assert out16.dtype == jnp.float32 and out16.shape == out32.shape
  real = mask > 0
  err = np.abs(np.asarray(out16) - np.asarray(out32))[real]
  assert np.isfinite(np.asarray(out16)).all()
  assert err.mean() < 0.05 * float(np.abs(np.asarray(out32)[real]).mean())
  assert math.sqrt(GEMMA2_2B["hidden_size"]) == 48.0  # exact in bfloat16: no rounding to copy
