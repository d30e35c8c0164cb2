"""CLIP (ViT-L/14 for the CLIP score of MJHQ-30K) in Flax: image and text towers, projections.

The CLIP score of a generated image and its prompt is 100 cos(image embedding, text embedding)
with OpenAI's ViT-L/14 (T2I.md section 3; SANA's clip_score.py uses logit_scale.exp(), which is
100 in the published weights, torchmetrics' CLIPScore a literal 100). The modules follow
transformers' CLIPModel (openai/clip-vit-large-patch14 in the Hugging Face layout), so
convert/clip.py maps every weight one to one; only images are NHWC here.

Both towers are pre-LN transformers with quick_gelu MLPs (x sigmoid(1.702 x)) and biased
projections:
  image: patches (conv p x p, stride p, no bias) after a learned class token, + learned
    positions, pre_layrnorm (sic, transformers' name), layers, post_layernorm on the class
    token, visual_projection (no bias).
  text: tokens + learned positions, causal layers, final_layer_norm, the state at the end-of-text
    token, text_projection (no bias). That token is found as transformers does: with
    eos_token_id None (what configs with the old eos_token_id 2 mean) at argmax(ids), since
    <|endoftext|> has the largest id of OpenAI's vocabulary; else at the first position of
    eos_token_id. Causal attention means padding after it never reaches it, so no padding mask
    is needed.

Param tree ('.' -> '/', list indices folded):
  vision_model/embeddings/{class_embedding (D_v,), patch_embedding/kernel (p, p, 3, D_v),
    position_embedding/embedding ((S / p)^2 + 1, D_v)}
  vision_model/{pre_layrnorm, post_layernorm}/{scale, bias}
  {vision,text}_model/encoder/layers_{i}/{layer_norm1, layer_norm2}/{scale, bias}
  {vision,text}_model/encoder/layers_{i}/self_attn/{q_proj, k_proj, v_proj, out_proj}/{kernel,
    bias}
  {vision,text}_model/encoder/layers_{i}/mlp/{fc1, fc2}/{kernel, bias}
  text_model/embeddings/{token_embedding, position_embedding}/embedding
  text_model/final_layer_norm/{scale, bias}
  visual_projection/kernel (D_v, P), text_projection/kernel (D_t, P), logit_scale ()

Images enter as `preprocess_images` leaves them: (B, 224, 224, 3), normalised with CLIP's mean
and std.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from hierdistill.models.attention import softmax_attention
from hierdistill.models.embeddings import Dense

Array = jax.Array
Dtype = Any

# openai/clip-vit-large-patch14 (config.json on the Hugging Face Hub).
CLIP_VIT_L14: Dict[str, Any] = dict(
    image_size=224, patch_size=14, vision_hidden_size=1024, vision_layers=24, vision_heads=16,
    vision_intermediate_size=4096, vocab_size=49408, max_text_length=77, text_hidden_size=768,
    text_layers=12, text_heads=12, text_intermediate_size=3072, projection_dim=768,
    layer_norm_eps=1e-5, eos_token_id=None)

CLIP_TINY: Dict[str, Any] = dict(
    image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=2, vision_heads=4,
    vision_intermediate_size=64, vocab_size=100, max_text_length=16, text_hidden_size=32,
    text_layers=2, text_heads=4, text_intermediate_size=64, projection_dim=24,
    layer_norm_eps=1e-5, eos_token_id=None)

CLIP_SCORE_SCALE = 100.0  # logit_scale.exp() of the published weights (clamped there at 100)
# OpenAI CLIP's pixel normalisation (the statistics of its training images).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: Array) -> Array:
  """x sigmoid(1.702 x): the GELU approximation CLIP was trained with (not nn.gelu)."""
  return x * jax.nn.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biased q, k, v, out projections; optional causal mask."""
  hidden_size: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, causal: bool) -> Array:
    """x: (B, N, D). Returns (B, N, D)."""
    b, n, d = x.shape
    hd = d // self.num_heads
    dense = lambda name: Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q, k, v = (dense(name)(x).reshape(b, n, self.num_heads, hd)
               for name in ("q_proj", "k_proj", "v_proj"))
    allowed = jnp.tril(jnp.ones((n, n), bool)) if causal else None
    out = softmax_attention(q, k, v, scale=hd ** -0.5, allowed=allowed).reshape(b, n, d)
    return dense("out_proj")(out)


class CLIPLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + fc2(quick_gelu(fc1(ln2(x))))."""
  hidden_size: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, causal: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.LayerNorm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = x + CLIPAttention(self.hidden_size, self.num_heads, name="self_attn", **kw)(h, causal)
    h = nn.LayerNorm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
    h = _Mlp(self.hidden_size, self.intermediate_size, name="mlp", **kw)(h)
    return x + h


class _Mlp(nn.Module):
  hidden_size: int
  intermediate_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = quick_gelu(Dense(self.intermediate_size, name="fc1", **kw)(x))
    return Dense(self.hidden_size, name="fc2", **kw)(h)


class _Encoder(nn.Module):
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, causal: bool) -> Array:
    for i in range(self.num_layers):
      x = CLIPLayer(self.hidden_size, self.num_heads, self.intermediate_size,
                    self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"layers_{i}")(x, causal)
    return x


class _VisionEmbeddings(nn.Module):
  image_size: int
  patch_size: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    """pixels (B, S, S, 3) -> tokens (B, 1 + (S / p)^2, D), class token first."""
    d, p = self.hidden_size, self.patch_size
    num_positions = (self.image_size // p) ** 2 + 1
    cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,), self.param_dtype)
    patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(
                          pixels)
    # Row-major patch order, as torch's flatten(2) of the (D, H/p, W/p) map.
    patches = patches.reshape(pixels.shape[0], -1, d)
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (pixels.shape[0], 1, d))
    positions = nn.Embed(num_positions, d, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="position_embedding")(jnp.arange(num_positions))
    return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTower(nn.Module):
  """transformers' CLIPVisionModel: images -> post_layernorm(class token)."""
  image_size: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    """pixels: (B, S, S, 3) normalised. Returns the pooled class token (B, D_v)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _VisionEmbeddings(self.image_size, self.patch_size, self.hidden_size,
                          name="embeddings", **kw)(pixels)
    x = nn.LayerNorm(self.layer_norm_eps, name="pre_layrnorm", **kw)(x)
    x = _Encoder(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size,
                 self.layer_norm_eps, name="encoder", **kw)(x, causal=False)
    return nn.LayerNorm(self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])


class _TextEmbeddings(nn.Module):
  vocab_size: int
  max_text_length: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)(ids)
    positions = nn.Embed(self.max_text_length, self.hidden_size, name="position_embedding",
                         **kw)(jnp.arange(ids.shape[1]))
    return x + positions[None]


class CLIPTextTower(nn.Module):
  """transformers' CLIPTextModel: ids -> final_layer_norm(state at the end-of-text token)."""
  vocab_size: int
  max_text_length: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  eos_token_id: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    """ids: (B, L) int, L <= max_text_length, each row holding an end-of-text token. Returns
    the state at that token after final_layer_norm (B, D_t)."""
    if ids.shape[1] > self.max_text_length:
      raise ValueError(f"CLIP text of {ids.shape[1]} tokens; at most {self.max_text_length} "
                       "(tokenize with truncation: text/clip_prompts.py).")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _TextEmbeddings(self.vocab_size, self.max_text_length, self.hidden_size,
                        name="embeddings", **kw)(ids)
    x = _Encoder(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size,
                 self.layer_norm_eps, name="encoder", **kw)(x, causal=True)
    x = nn.LayerNorm(self.layer_norm_eps, name="final_layer_norm", **kw)(x)
    if self.eos_token_id is None:
      eos = jnp.argmax(ids, axis=-1)
    else:
      eos = jnp.argmax(ids == self.eos_token_id, axis=-1)
    return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class CLIP(nn.Module):
  """transformers' CLIPModel: encode_image, encode_text -> projected embeddings (B, P).

  Fields: the sizes of CLIP_VIT_L14 / CLIP_TINY; eos_token_id: None = pool the text at
  argmax(ids) (OpenAI's vocabulary, configs with eos_token_id 2), else at the first eos_token_id;
  dtype: compute dtype (float32 by default: a metric); param_dtype: storage dtype.
  """
  image_size: int = 224
  patch_size: int = 14
  vision_hidden_size: int = 1024
  vision_layers: int = 24
  vision_heads: int = 16
  vision_intermediate_size: int = 4096
  vocab_size: int = 49408
  max_text_length: int = 77
  text_hidden_size: int = 768
  text_layers: int = 12
  text_heads: int = 12
  text_intermediate_size: int = 3072
  projection_dim: int = 768
  layer_norm_eps: float = 1e-5
  eos_token_id: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = CLIPVisionTower(
        self.image_size, self.patch_size, self.vision_hidden_size, self.vision_layers,
        self.vision_heads, self.vision_intermediate_size, self.layer_norm_eps, **kw)
    self.text_model = CLIPTextTower(
        self.vocab_size, self.max_text_length, self.text_hidden_size, self.text_layers,
        self.text_heads, self.text_intermediate_size, self.layer_norm_eps, self.eos_token_id,
        **kw)
    self.visual_projection = Dense(self.projection_dim, use_bias=False, **kw)
    self.text_projection = Dense(self.projection_dim, use_bias=False, **kw)
    # Imported so that every key of the file is used; the score uses CLIP_SCORE_SCALE, which
    # is its exp() in the published weights.
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)),
                                  (), self.param_dtype)

  def encode_image(self, pixels: Array) -> Array:
    """pixels: (B, S, S, 3) from preprocess_images. Returns (B, P) float32 (not normalised)."""
    expected = (self.image_size, self.image_size, 3)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
      raise ValueError(f"CLIP expects images of shape (B, {expected[0]}, {expected[1]}, 3) "
                       f"(NHWC, from preprocess_images); got {pixels.shape}.")
    pooled = self.vision_model(pixels.astype(self.dtype))
    return self.visual_projection(pooled).astype(jnp.float32)

  def encode_text(self, ids: Array) -> Array:
    """ids: (B, L) int, L <= max_text_length (text/clip_prompts.py). Returns (B, P) float32."""
    return self.text_projection(self.text_model(ids)).astype(jnp.float32)

  def __call__(self, pixels: Array, ids: Array) -> Tuple[Array, Array]:
    """(image embeddings, text embeddings), each (B, P) float32 (not normalised)."""
    return self.encode_image(pixels), self.encode_text(ids)


def clip_score(image_embeds: Array, text_embeds: Array, scale: float = CLIP_SCORE_SCALE
               ) -> Array:
  """scale cos(image, text) per pair: (B, P), (B, P) -> (B,) float32.

  No clamp at 0 (torchmetrics' CLIPScore clamps; OpenAI-clip scripts such as SANA's do not; the
  two differ only for negative cosines, which matched prompts do not give).
  """
  image = image_embeds.astype(jnp.float32)
  text = text_embeds.astype(jnp.float32)
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  return scale * jnp.sum(image * text, axis=-1)


def resized_shape(height: int, width: int, shortest_edge: int = 224) -> Tuple[int, int]:
  """(h, w) with the shorter side at shortest_edge and the other int(edge * long / short),
  truncated, as torchvision's Resize(int) and transformers' CLIP image processor compute it."""
  short, long = min(height, width), max(height, width)
  new_long = int(shortest_edge * long / short)
  return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def preprocess_images(images: Array, image_size: int = 224, *, quantize: bool = True) -> Array:
  """CLIP's image preprocessing in JAX (jit-able; sizes are static): (B, H, W, 3) -> (B, S, S, 3).

  images: uint8 in [0, 255], or floats in [0, 1]. Steps, as CLIPImageProcessor (PIL backend)
  and OpenAI's clip.load preprocess do them:
  1. resize the shorter side to S (`resized_shape`), bicubic (Keys, a = -0.5) with an
     antialiasing kernel widened by the downscale factor: PIL's BICUBIC resampling;
  2. with quantize (default), float images are first rounded to the 8-bit image they would be
     saved as, and resized as PIL resizes an 8-bit image: the width first, rounded to 8-bit
     levels and clipped, then the height, rounded and clipped again (the clip between the
     passes cuts the cubic's overshoot, up to a dozen levels on sharp edges when upsampling);
     without, one float resize of both axes;
  3. centre crop S x S from offset ((h - S) // 2, (w - S) // 2);
  4. scale to [0, 1], then (x - CLIP_MEAN) / CLIP_STD per channel.
  Agreement with the PIL path: within one 8-bit level per pixel (PIL resamples in fixed point).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"preprocess_images expects (B, H, W, 3) RGB images; got {images.shape}.")
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) if x.dtype == jnp.uint8 else x.astype(jnp.float32) * 255.0
  b, h, w, _ = x.shape
  nh, nw = resized_shape(h, w, image_size)
  resize = lambda x, shape: jax.image.resize(x, shape, method="bicubic", antialias=True)
  to_8bit = lambda x: jnp.clip(jnp.round(x), 0.0, 255.0)
  if not quantize:
    x = resize(x, (b, nh, nw, 3))
  else:  # floats become the 8-bit image they would be saved as; uint8 is unchanged
    x = to_8bit(x)
    if (nh, nw) != (h, w):
      x = to_8bit(resize(to_8bit(resize(x, (b, h, nw, 3))), (b, nh, nw, 3)))
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size] / 255.0
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
