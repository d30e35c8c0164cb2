"""Gemma-2 decoder stack as a frozen text encoder: token ids -> last hidden state (B, L, D).

SANA conditions on `AutoModelForCausalLM(gemma-2-2b-it).get_decoder()`, i.e. transformers'
Gemma2Model without its LM head: the output is the last hidden state after the final norm, one
2304-d vector per token (T2I.md). This module computes the same function, in Flax, so the
encoder can run inside a jitted JAX step (no host callback, no torch).

A layer, as Gemma-2 has it (norms on both sides of each sub-block, "sandwich" norms):
  x = x + post_attention_norm(attention(input_norm(x)))
  x = x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))
attention: grouped-query (num_heads queries share num_kv_heads keys/values, head h reads kv head
h // (num_heads / num_kv_heads)), RoPE on q and k, logits scaled by query_pre_attn_scalar^-1/2
(not head_dim^-1/2: equal for the 2B, distinct parameters in the config), soft-capped as
cap * tanh(logits / cap), causal, plus a sliding window on every other layer (the even layer
indices 0, 2, ..., as transformers' default layer_types), plus the padding mask on keys.
mlp: down(gelu_tanh(gate(x)) * up(x)). RMSNorm: x / rms(x) * (1 + w), in float32.

Param tree (transformers' names, '.' -> '/', list indices folded: layers.3 -> layers_3), so
convert/gemma2.py maps every weight one to one:

  embed_tokens/embedding (V, D)
  layers_{i}/input_layernorm/weight (D,)            RMSNorm offsets: the scale is 1 + weight
  layers_{i}/self_attn/{q_proj (D, H hd), k_proj (D, K hd), v_proj (D, K hd),
                        o_proj (H hd, D)}/kernel     no biases
  layers_{i}/post_attention_layernorm/weight, layers_{i}/pre_feedforward_layernorm/weight,
  layers_{i}/post_feedforward_layernorm/weight
  layers_{i}/mlp/{gate_proj (D, F), up_proj (D, F), down_proj (F, D)}/kernel
  norm/weight (D,)

Precision: matmuls in `dtype` (bfloat16 for the real encoder, as SANA runs it), norms, RoPE
tables, logits and softmax in float32; the residual stream is float32 (transformers keeps it
in the weights' dtype: the bf16 rounding of 52 residual additions is what we do not copy).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from hierdistill.models.attention import softmax_attention
from hierdistill.models.embeddings import Dense, accumulation_dtype

Array = jax.Array
Dtype = Any

SLIDING, GLOBAL = "sliding_attention", "full_attention"  # transformers' layer_types names

# google/gemma-2-2b(-it), the text encoder of SANA (Efficient-Large-Model/gemma-2-2b-it):
# transformers' Gemma2Config defaults are the 9B's, so every size is spelled out.
GEMMA2_2B: Dict[str, Any] = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8,
    num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256, attn_logit_softcap=50.0,
    sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-6)

# Small enough for a CPU test, with every feature switched on: GQA (2 queries per kv head), a
# sliding window shorter than a test sequence (so the sliding layers differ from the global
# ones), a soft-cap low enough to bite on random weights.
GEMMA2_TINY: Dict[str, Any] = dict(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcap=5.0,
    sliding_window=4, rope_theta=10000.0, rms_norm_eps=1e-6)

GEMMA2_SIZES: Dict[str, Dict[str, Any]] = {"2b": GEMMA2_2B, "tiny": GEMMA2_TINY}


def default_layer_types(num_layers: int) -> Tuple[str, ...]:
  """Sliding window on layers 0, 2, 4, ..., global attention on 1, 3, 5, ... (Gemma-2)."""
  return tuple(SLIDING if i % 2 == 0 else GLOBAL for i in range(num_layers))


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * (1 + weight), computed in float32; weight starts at 0.

  Gemma multiplies by (1 + w) in float32 before casting back (Llama casts first), so the output
  is rounded once, to `dtype`.
  """
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (..., D). Returns (..., D) in `dtype`."""
    weight = self.param("weight", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> Tuple[Array, Array]:
  """cos, sin of RoPE for positions 0 .. length - 1: each (length, head_dim) float32.

  Frequencies theta^(-2k / head_dim), k < head_dim / 2, laid out twice ([f | f]) to match the
  rotate-half convention below (transformers' Llama/Gemma layout, not interleaved pairs).
  """
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x (B, L, heads, hd) rotated: x cos + rotate_half(x) sin, rotate_half([a | b]) = [-b | a]."""
  a, b = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-b, a], axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def attention_mask(mask: Array, sliding_window: Optional[int]) -> Array:
  """Which key each query may attend to: (B, 1, 1, L, L) bool, axes (B, kv, group, q, k).

  mask: (B, L), 1 for real tokens. Causal (k <= q), keys that are real tokens, and with a
  window W: k > q - W (the query and the W - 1 tokens before it; transformers'
  sliding_window_overlay).
  """
  length = mask.shape[1]
  q = jnp.arange(length)[:, None]
  k = jnp.arange(length)[None, :]
  allowed = k <= q
  if sliding_window is not None:
    allowed = allowed & (k > q - sliding_window)
  allowed = allowed[None] & (mask[:, None, :] > 0)
  return allowed[:, None, None]


class Gemma2Attention(nn.Module):
  """Grouped-query self-attention with RoPE, soft-capped logits and an optional window."""
  hidden_size: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  attn_logit_softcap: Optional[float]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, allowed: Array) -> Array:
    """x: (B, L, D); cos, sin: (L, hd); allowed: (B, 1, 1, L, L). Returns (B, L, D), dtype."""
    b, length, _ = x.shape
    kv, group, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
    dense = lambda n, name: Dense(n, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    q = dense(self.num_heads * hd, "q_proj")(x).reshape(b, length, self.num_heads, hd)
    k = dense(kv * hd, "k_proj")(x).reshape(b, length, kv, hd)
    v = dense(kv * hd, "v_proj")(x).reshape(b, length, kv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Query head h = kv_head * group + g reads kv_head: transformers' repeat_kv order. A padded
    # query whose whole window is padding gets a finite, ignored row (softmax_attention's floor).
    q = q.reshape(b, length, kv, group, hd)
    out = softmax_attention(q, k, v, scale=self.query_pre_attn_scalar ** -0.5, allowed=allowed,
                            softcap=self.attn_logit_softcap)
    out = out.reshape(b, length, self.num_heads * hd)
    return dense(self.hidden_size, "o_proj")(out)


class Gemma2MLP(nn.Module):
  """GeGLU: down(gelu_tanh(gate(x)) * up(x)), no biases."""
  hidden_size: int
  intermediate_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, L, D). Returns (B, L, D) in dtype."""
    dense = lambda n, name: Dense(n, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    gate = nn.gelu(dense(self.intermediate_size, "gate_proj")(x), approximate=True)
    return dense(self.hidden_size, "down_proj")(gate * dense(self.intermediate_size, "up_proj")(x))


class Gemma2Layer(nn.Module):
  """One decoder layer with Gemma-2's pre- and post-norms around attention and MLP."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  attn_logit_softcap: Optional[float]
  rms_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, allowed: Array) -> Array:
    """x: (B, L, D) residual stream (float32). Returns x's shape and dtype."""
    norm = lambda name: RMSNorm(self.rms_norm_eps, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=name)
    h = norm("input_layernorm")(x)
    h = Gemma2Attention(self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                        self.query_pre_attn_scalar, self.attn_logit_softcap, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="self_attn")(h, cos, sin, allowed)
    x = x + norm("post_attention_layernorm")(h).astype(x.dtype)
    h = norm("pre_feedforward_layernorm")(x)
    h = Gemma2MLP(self.hidden_size, self.intermediate_size, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="mlp")(h)
    return x + norm("post_feedforward_layernorm")(h).astype(x.dtype)


class Gemma2Encoder(nn.Module):
  """Gemma2Model (decoder stack, no LM head): (ids, mask) -> last hidden state.

  Fields: the sizes of GEMMA2_2B / GEMMA2_TINY; layer_types: one of SLIDING / GLOBAL a layer
  (None = default_layer_types); attn_logit_softcap None disables the cap; dtype: compute dtype
  of the matmuls (bfloat16 for the real encoder); param_dtype: storage dtype.
  """
  vocab_size: int = 256000
  hidden_size: int = 2304
  intermediate_size: int = 9216
  num_layers: int = 26
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 256
  query_pre_attn_scalar: float = 256.0
  attn_logit_softcap: Optional[float] = 50.0
  sliding_window: Optional[int] = 4096
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  layer_types: Optional[Tuple[str, ...]] = None
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  def resolved_layer_types(self) -> Tuple[str, ...]:
    types = default_layer_types(self.num_layers) if self.layer_types is None else \
        tuple(self.layer_types)
    if len(types) != self.num_layers or not set(types) <= {SLIDING, GLOBAL}:
      raise ValueError(f"layer_types={types!r}: expected {self.num_layers} entries, each "
                       f"{SLIDING!r} or {GLOBAL!r} (or None for Gemma-2's alternation).")
    return types

  def _check(self, ids: Array, mask: Array) -> None:
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (grouped-query attention).")
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"Gemma2Encoder expects ids and mask of the same shape (B, L); got "
                       f"{ids.shape} and {mask.shape}.")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"Gemma2Encoder expects integer token ids; got dtype {ids.dtype}.")

  @nn.compact
  def __call__(self, ids: Array, mask: Array) -> Array:
    """ids: (B, L) int token ids; mask: (B, L), 1 = real token, 0 = padding (right padding:
    positions are 0 .. L - 1 whatever the mask). Returns (B, L, hidden_size) float32: the
    last hidden state after the final norm, at every position (those of padding are defined
    but meaningless; SANA's cross-attention masks them with the same mask)."""
    self._check(ids, mask)
    acc = accumulation_dtype(self.dtype)
    table = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embed_tokens")
    # transformers multiplies by sqrt(D) cast to the weights' dtype (sqrt(3072) = 55.43 becomes
    # 55.5 in bfloat16); the compute dtype plays that role here. sqrt(2304) = 48 is exact.
    normalizer = jnp.asarray(math.sqrt(self.hidden_size), self.dtype)
    x = (table(ids) * normalizer).astype(acc)
    cos, sin = rope_tables(ids.shape[1], self.head_dim, self.rope_theta)
    masks = {SLIDING: attention_mask(mask, self.sliding_window), GLOBAL: attention_mask(mask, None)}
    for i, kind in enumerate(self.resolved_layer_types()):
      x = Gemma2Layer(self.hidden_size, self.intermediate_size, self.num_heads,
                      self.num_kv_heads, self.head_dim, self.query_pre_attn_scalar,
                      self.attn_logit_softcap, self.rms_norm_eps, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"layers_{i}")(x, cos, sin, masks[kind])
    return RMSNorm(self.rms_norm_eps, dtype=acc, param_dtype=self.param_dtype, name="norm")(x)
