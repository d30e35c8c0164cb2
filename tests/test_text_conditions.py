"""Text conditions: the text DiT (cross-attention), the null condition and its dropout, CFG
against the empty prompt, and the digits captions and their frozen encoder.

The chain with text (every stage on 1 device and on a (4, 2) mesh, resume, a caption swap)
runs in tests/test_pipeline.py, parametrised over both kinds of condition.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hierdistill import conditions as cond_lib
from hierdistill import paths
from hierdistill.data import digits_text as text_lib
from hierdistill.models import DiT, init_student_from_teacher

TEXT_DIT = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                num_classes=10, caption_channels=12, cross_num_heads=2)
L = 5


def random_params(model, *args, scale=0.1, seed=0):
  """Random params everywhere (zero-init ones too: a fresh cross-attention adds exactly 0)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), shapes)


def text_inputs(batch=3, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((batch, 8, 8, 4)).astype(dtype)
  t = rng.uniform(0.2, 1.0, (batch,)).astype(dtype)
  r = (t * rng.uniform(0.0, 0.9, (batch,))).astype(dtype)
  mask = np.zeros((batch, L), np.int32)
  for i in range(batch):
    mask[i, :2 + i % (L - 1)] = 1  # BOS + words, then padding
  c = {"embeddings": rng.standard_normal((batch, L, 12)).astype(dtype), "mask": mask}
  return jnp.asarray(z), jnp.asarray(r), jnp.asarray(t), jax.tree.map(jnp.asarray, c)


def null_condition():
  emb = np.random.default_rng(9).standard_normal((L, 12)).astype(np.float32)
  return cond_lib.Text(emb, np.array([1] + [0] * (L - 1), np.int32))


# -- the network -------------------------------------------------------------------------------

def test_text_dit_has_cross_attention_and_no_label_table_while_label_dit_is_unchanged():
  z, r, t, c = text_inputs()
  text = jax.eval_shape(DiT(**TEXT_DIT).init, jax.random.key(0), z, t, t, c)["params"]
  labels = jax.eval_shape(DiT(**{**TEXT_DIT, "caption_channels": 0}).init, jax.random.key(0), z,
                          t, t, jnp.zeros((3,), jnp.int32))["params"]
  text_keys = {"/".join(k) for k in traverse_util.flatten_dict(text)}
  label_keys = {"/".join(k) for k in traverse_util.flatten_dict(labels)}
  assert "caption_projection/linear_1/kernel" in text_keys
  assert "blocks_1/cross_attn/kv_linear/kernel" in text_keys
  assert not any(k.startswith("y_embedder") for k in text_keys)
  # A label DiT: exactly the published layout (nothing of text added).
  assert not any("cross_attn" in k or "caption" in k for k in label_keys)
  assert text_keys - label_keys == {k for k in text_keys if "cross_attn" in k or "caption" in k}
  assert label_keys - text_keys == {"y_embedder/embedding_table/embedding"}


def test_padded_tokens_are_not_read():
  model = DiT(**TEXT_DIT)
  z, r, t, c = text_inputs()
  params = random_params(model, z, t, t, c)
  changed = dict(c, embeddings=jnp.where(c["mask"][..., None] == 0, 100.0, c["embeddings"]))
  swapped = dict(c, embeddings=c["embeddings"].at[:, 1].add(1.0))  # a real token
  apply = jax.jit(lambda c_: model.apply({"params": params}, z, None, t, c_))
  np.testing.assert_allclose(apply(changed), apply(c), rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(apply(swapped) - apply(c)))) > 1e-3


def test_text_dit_jvp_through_cross_attention_matches_finite_difference():
  """MeanFlow's du/dt with tangents (v, 0, 1) through cross-attention, float64."""
  with jax.enable_x64(True):
    model = DiT(interval_conditioning=True, dtype=jnp.float64, param_dtype=jnp.float64,
                **TEXT_DIT)
    z, r, t, c = text_inputs(dtype=np.float64)
    v_dir = jnp.asarray(np.random.default_rng(7).standard_normal(z.shape))
    params = random_params(model, z, r, t, c)
    eps = 1e-6

    @jax.jit
    def jvp_and_fd(p):
      u_fn = lambda z_, r_, t_: model.apply({"params": p}, z_, r_, t_, c)
      u, du = jax.jvp(u_fn, (z, r, t), (v_dir, jnp.zeros_like(r), jnp.ones_like(t)))
      fd = (u_fn(z + eps * v_dir, r, t + eps) - u_fn(z - eps * v_dir, r, t - eps)) / (2 * eps)
      return u, du, fd

    u, du, fd = jvp_and_fd(params)
    assert du.dtype == jnp.float64 and float(jnp.max(jnp.abs(du))) > 1e-3
    np.testing.assert_allclose(du, fd, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(du))))


def test_text_student_from_teacher_is_exact_at_init():
  z, r, t, c = text_inputs()
  teacher, student = DiT(**TEXT_DIT), DiT(interval_conditioning=True, **TEXT_DIT)
  teacher_params = random_params(teacher, z, t, t, c)
  fresh = student.init(jax.random.key(1), z, t, t, c)["params"]
  params = init_student_from_teacher(fresh, teacher_params)
  v = teacher.apply({"params": teacher_params}, z, None, t, c)
  u = student.apply({"params": params}, z, r, t, c)
  np.testing.assert_array_equal(u, v)


def test_text_dit_in_bfloat16_with_remat_and_features():
  z, r, t, c = text_inputs()
  m32 = DiT(interval_conditioning=True, **TEXT_DIT)
  m16 = DiT(interval_conditioning=True, dtype=jnp.bfloat16, remat=True, **TEXT_DIT)
  params = random_params(m32, z, r, t, c)
  v32, (v16, feats) = jax.jit(lambda p: (
      m32.apply({"params": p}, z, r, t, c),
      m16.apply({"params": p}, z, r, t, c, return_features=True)))(params)
  assert v16.dtype == jnp.float32 and [f.shape for f in feats] == [(3, 16, 32)] * 2
  np.testing.assert_allclose(v16, v32, atol=5e-2 * float(jnp.max(jnp.abs(v32))))


def test_a_text_dit_given_labels_says_what_it_reads():
  z, _, t, _ = text_inputs()
  with pytest.raises(ValueError, match=r"text DiT \(caption_channels > 0\) reads c = "):
    DiT(**TEXT_DIT).init(jax.random.key(0), z, None, t, jnp.zeros((3,), jnp.int32))


# -- the null condition, dropout and guidance --------------------------------------------------

def test_caption_dropout_replaces_whole_captions_by_the_empty_prompt():
  kind = null_condition()
  _, _, _, c = text_inputs(batch=2000)
  assert kind.drop(jax.random.key(0), c, 0.0) is c
  dropped = kind.drop(jax.random.key(0), c, 0.3)
  is_null = jnp.all(dropped["mask"] == kind.null_mask, axis=1) & jnp.all(
      dropped["embeddings"] == kind.null_embeddings, axis=(1, 2))
  kept = jnp.all(dropped["embeddings"] == c["embeddings"], axis=(1, 2))
  assert bool(jnp.all(is_null | kept))  # each row is whole: the caption or the empty prompt
  assert 0.25 < float(jnp.mean(is_null)) < 0.35
  all_null = kind.drop(jax.random.key(1), c, 1.0)
  np.testing.assert_array_equal(all_null["mask"], np.broadcast_to(kind.null_mask, (2000, L)))


def test_cfg_with_the_empty_prompt_equals_the_unconditional_pass():
  """v_w = v(empty) + w (v(c) - v(empty)), the empty prompt's pass run by hand."""
  model = DiT(**TEXT_DIT)
  z, _, t, c = text_inputs()
  params = random_params(model, z, t, t, c)
  kind = null_condition()
  v_fn = lambda z_, t_, c_: model.apply({"params": params}, z_, None, t_, c_)
  guided = jax.jit(lambda: paths.cfg_velocity(v_fn, z, t, c, w=3.0, null=kind.null_like(c)))()
  null = jax.tree.map(jnp.asarray, kind.example(3))
  v_cond, v_uncond = v_fn(z, t, c), v_fn(z, t, null)
  np.testing.assert_allclose(guided, v_uncond + 3.0 * (v_cond - v_uncond), rtol=1e-5,
                             atol=1e-5)
  # Guiding the empty prompt towards itself changes nothing.
  at_null = paths.cfg_velocity(v_fn, z, t, null, w=3.0, null=kind.null_like(null))
  np.testing.assert_allclose(at_null, v_uncond, rtol=1e-5, atol=1e-5)


def test_label_kind_nulls_to_label_k_and_leaves_dropout_to_the_embedder():
  kind = cond_lib.Labels(10)
  y = jnp.array([3, 7])
  np.testing.assert_array_equal(kind.null_like(y), [10, 10])
  assert kind.drop(jax.random.key(0), y, 0.5) is y


def test_a_null_prompt_without_a_real_token_is_refused():
  with pytest.raises(ValueError, match="no real token"):
    cond_lib.Text(np.zeros((4, 3)), np.zeros((4,)))


# -- the digits captions -----------------------------------------------------------------------

def test_measured_attributes_order_strokes_and_slants():
  img = -np.ones((3, 8, 8, 1))
  img[0, :, 3] = 1.0  # a thin upright bar
  img[1, :, 3:5] = 1.0  # a bold upright bar
  for row in range(8):
    img[2, row, 7 - row] = 1.0  # top right to bottom left: leans right
  mass, slant = text_lib.measure_attributes(img).T
  assert mass[1] == 2 * mass[0]
  assert abs(slant[0]) < 1e-9 and slant[2] > 0.9


def test_training_captions_split_each_class_in_thirds_and_agree_with_themselves():
  from hierdistill.sources.digits_text import caption_agreement
  from sklearn import datasets
  d = datasets.load_digits()
  x = (d.images[..., None] / 16.0) * 2 - 1
  y = d.target
  attrs = text_lib.measure_attributes(x)
  thresholds = text_lib.fit_thresholds(attrs, y, 10)
  words = text_lib.bucket(attrs, y, thresholds)
  for k in range(10):
    shares = np.bincount(words[y == k, 0], minlength=3) / np.sum(y == k)
    assert np.all(np.abs(shares - 1 / 3) < 0.05)
  asks = np.concatenate([y[:, None], words], axis=1)
  assert caption_agreement(x, asks, thresholds)["caption_agreement"] == 1.0
  # Asking for other words than the image has: no agreement.
  other = asks.copy()
  other[:, 1] = (other[:, 1] + 1) % 3
  assert caption_agreement(x, other, thresholds)["stroke_agreement"] == 0.0


def test_captions_round_trip_and_unknown_words_are_named():
  text = text_lib.caption(7, 2, 0)
  assert text == "a bold, left-leaning seven"
  assert text_lib.parse_caption(text) == (7, 2, 0)
  ids, mask = text_lib.tokenize([text, ""])
  assert mask.tolist() == [[1] * 5 + [0] * 3, [1] + [0] * 7]  # the empty prompt keeps its BOS
  with pytest.raises(ValueError, match=r"unknown word\(s\) \['purple'\]"):
    text_lib.tokenize(["a purple seven"])


def test_the_frozen_encoder_is_deterministic_and_separates_words():
  a = text_lib.encode(["a bold, upright seven", "a thin, upright seven"])
  b = text_lib.encode(["a bold, upright seven"])
  # The same prompt, the same encoding (to float32 precision: batch shapes compile apart).
  np.testing.assert_allclose(a["embeddings"][:1], b["embeddings"], rtol=1e-5, atol=1e-6)
  assert a["embeddings"].shape == (2, text_lib.MAX_TOKENS, text_lib.ENCODER_WIDTH)
  assert float(np.abs(a["embeddings"][0] - a["embeddings"][1]).max()) > 0.1
  assert float(np.abs(a["embeddings"][:, 5:]).max()) == 0.0  # padding is zero


def test_captioned_grid_puts_one_caption_under_each_row(tmp_path):
  from hierdistill.evaluation import grids
  images = -np.ones((5, 8, 8, 1), np.float32)
  one = grids.save_captioned_grid(images[:2], ["a"] * 2, str(tmp_path / "one.png"))
  two = grids.save_captioned_grid(images, ["a", "a", "b", "b", "b"], str(tmp_path / "two.png"))
  assert two.shape[0] == 2 * one.shape[0]  # two captions, two rows
  wrapped = grids.save_captioned_grid(images, ["a"] * 5, str(tmp_path / "w.png"), max_columns=2)
  assert wrapped.shape[0] == 3 * one.shape[0]  # one caption wrapped after 2 columns
  with pytest.raises(ValueError, match="5 images need 5 captions"):
    grids.save_captioned_grid(images, ["a"], str(tmp_path / "x.png"))


@pytest.mark.parametrize("n", [80, 16])
def test_the_eval_grid_spreads_its_rows_over_every_stroke_and_slant(n):
  """The eval's asks are sorted by caption; its grid (80 in digits_text, 16 in tiny) must not be
  their first caption over and over but rows of one caption with all nine word pairs."""
  from hierdistill.sources.digits_text import GRID_COLUMNS, spread_rows
  rng = np.random.default_rng(0)
  # Skewed like measured captions: some pairs rare, one (digit, pair) never asked.
  asks = np.stack([rng.integers(0, 10, 1000), rng.choice(3, 1000, p=[0.5, 0.3, 0.2]),
                   rng.choice(3, 1000, p=[0.6, 0.3, 0.1])], axis=1)
  asks = asks[~((asks[:, 0] == 2) & (asks[:, 1] == 2) & (asks[:, 2] == 2))]
  asks = asks[np.lexsort((asks[:, 0], asks[:, 2], asks[:, 1]))]
  rows = spread_rows(asks, n)
  assert len(rows) == n == len(set(rows.tolist()))
  picked = asks[rows]
  assert {tuple(p) for p in picked[:, 1:]} == {(s, l) for s in range(3) for l in range(3)}
  changes = np.flatnonzero(np.any(picked[1:] != picked[:-1], axis=1)) + 1
  widths = np.diff(np.concatenate([[0], changes, [n]]))
  assert widths.max() <= min(GRID_COLUMNS, n // 9)  # rows of one caption, at most a grid row
