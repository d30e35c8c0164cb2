"""LightningDiT (Yao et al. 2025, hustvl/LightningDiT): DiT's skeleton with a modernised block,
as teacher v(z, t | y) and student u(z, r, t | y) like models/dit.DiT.

What differs from DiT, read from the official models/lightningdit.py (XL/1 of the published
800-epoch model: use_swiglu, use_rope, use_rmsnorm on; use_qknorm and wo_shift off):
- every LayerNorm (the blocks' two and the final layer's) is an RMSNorm with a learned weight:
  x / sqrt(mean(x^2) + 1e-6) * w, computed in float32;
- the MLP is SwiGLU: w12 (D -> 2H, bias) split in halves (a, b), silu(a) * b, w3 (H -> D, bias),
  H = int(2 / 3 * int(D * mlp_ratio)) (3072 for XL);
- rotary position embedding on q and k of every head (EVA-02's 2-D VisionRotaryEmbeddingFast):
  the head is split in two halves of head_dim / 2, the first rotated by the token's row, the
  second by its column, with frequencies theta^(-2k / (head_dim / 2)), k < head_dim / 4, each
  rotating the adjacent pair (x_{2k}, x_{2k+1}). The absolute 2-D sin-cos table is still added
  at the input, as in DiT;
- optional qk-norm: an RMSNorm over head_dim on q and k before the rotation (off in XL/1);
- patch 1 on 16x16x32 VA-VAE latents (256 tokens), no learn_sigma half.
Its time convention is SiT's (transport/path.py: x_t' = t' x + (1 - t') e, velocity x - e,
t' = 0 noise, embedded in [0, 1]): the importer (convert/lightningdit.py) negates the final
layer, and the model embeds 1 - t (time_scale=1, time_flip=True), as for SiT.

Param tree (DiT's, with these blocks):
  x_embedder, t_embedder/{mlp_0, mlp_2}, [interval_embedder], y_embedder/embedding_table
  blocks_{i}/norm1/scale (D,), blocks_{i}/norm2/scale (D,)
  blocks_{i}/attn/{qkv (D, 3D), proj (D, D)}, [blocks_{i}/attn/{q_norm, k_norm}/scale (hd,)]
  blocks_{i}/mlp/{w12 (D, 2H), w3 (H, D)}, blocks_{i}/adaLN_modulation (D, 6D)
  final_layer/norm_final/scale, final_layer/adaLN_modulation (D, 2D), final_layer/linear
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hierdistill import sharding
from hierdistill.models.dit import (_XAVIER, _ZEROS, _PATCH_INIT, DiT, _modulate,
                                    sincos_pos_embed_2d, unpatchify)
from hierdistill.models.embeddings import Dense, accumulation_dtype, to_float
from hierdistill.models.block_stack import apply_blocks

Array = jax.Array
Dtype = Any

# Named sizes of the official models file (LightningDiT_models); the patch comes from "/p".
LIGHTNINGDIT_SIZES = {
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "1p0B": dict(depth=24, hidden_size=1536, num_heads=24),
    "1p6B": dict(depth=28, hidden_size=1792, num_heads=28),
}


def lightningdit_config(name: str):
  """Sizes of a named model, e.g. 'XL/1' or 'LightningDiT-XL/1' -> depth, hidden_size,
  num_heads, patch_size (the official LightningDiT_models table)."""
  base = name.strip()
  if base.lower().startswith("lightningdit-"):
    base = base[len("lightningdit-"):]
  size, _, patch = base.partition("/")
  key = next((k for k in LIGHTNINGDIT_SIZES if k.lower() == size.lower()), None)
  if key is None or not patch.isdigit():
    raise ValueError(f"Unknown LightningDiT size {name!r}: expected "
                     f"{{{','.join(LIGHTNINGDIT_SIZES)}}}/p, e.g. 'XL/1'.")
  return dict(LIGHTNINGDIT_SIZES[key], patch_size=int(patch))


def rope_tables(head_dim: int, grid_size: int, theta: float = 10000.0
                ) -> Tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (grid_size^2, head_dim) float32: EVA-02's 2-D rotary tables as
  LightningDiT builds them (dim = head_dim / 2 per axis; tokens row-major; the first half of the
  head rotates with the row, the second with the column; each frequency repeated for its pair).
  """
  if head_dim % 4:
    raise ValueError(f"head_dim={head_dim} must be divisible by 4 for the 2-D rotary embedding.")
  dim = head_dim // 2
  freqs = 1.0 / theta ** (np.arange(0, dim, 2)[: dim // 2].astype(np.float32) / dim)
  pos = np.arange(grid_size, dtype=np.float32)
  ang = np.repeat(np.outer(pos, freqs), 2, axis=-1)  # (G, dim), pairs share a frequency
  rows = np.broadcast_to(ang[:, None, :], (grid_size, grid_size, dim))
  cols = np.broadcast_to(ang[None, :, :], (grid_size, grid_size, dim))
  table = np.concatenate([rows, cols], -1).reshape(grid_size * grid_size, head_dim)
  return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x (B, N, H, hd) rotated pairwise: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
  return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) in float32, times a learned weight (param 'scale', init 1)."""
  eps: float = 1e-6
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    acc = accumulation_dtype(x.dtype)
    h = x.astype(acc)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
    # The official casts back to the input dtype before the weight (type_as(x) * weight).
    return (h.astype(x.dtype) * scale.astype(x.dtype)).astype(self.dtype or x.dtype)


class RopeAttention(nn.Module):
  """Self-attention with a fused qkv (bias), optional qk RMSNorm, rotary q and k.

  implementation as models/dit.Attention: 'einsum' (float32 softmax, JVP-safe), 'xla', 'auto'.
  """
  hidden_size: int
  num_heads: int
  qk_norm: bool = False
  implementation: str = "einsum"
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cos: Optional[Array], sin: Optional[Array]) -> Array:
    """x: (B, N, D); cos, sin: (N, head_dim) rotary tables or None. Returns (B, N, D)."""
    b, n, d = x.shape
    hd = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = Dense(3 * d, kernel_init=_XAVIER, bias_init=_ZEROS, name="qkv", **kw)(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      q = RMSNorm(name="q_norm", **kw)(q)
      k = RMSNorm(name="k_norm", **kw)(k)
    if cos is not None:
      q, k = (apply_rope(a, cos.astype(a.dtype), sin.astype(a.dtype)) for a in (q, k))
    if self.implementation == "einsum":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                          preferred_element_type=accumulation_dtype(q.dtype))
      weights = jax.nn.softmax(logits * hd ** -0.5, axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      impl = "xla" if self.implementation == "xla" else None
      out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    return Dense(d, kernel_init=_XAVIER, bias_init=_ZEROS, name="proj", **kw)(
        out.reshape(b, n, d))


class SwiGLU(nn.Module):
  """w12 (D -> 2H) split (a, b), silu(a) * b, w3 (H -> D); biases on both."""
  hidden_size: int
  ffn_size: int
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(2 * self.ffn_size, kernel_init=_XAVIER, bias_init=_ZEROS, name="w12", **kw)(x)
    a, b = jnp.split(h, 2, axis=-1)
    return Dense(self.hidden_size, kernel_init=_XAVIER, bias_init=_ZEROS, name="w3", **kw)(
        nn.silu(a) * b)


class LightningDiTBlock(nn.Module):
  """adaLN-Zero block (shift, scale, gate for attention and MLP) around RMSNorm, rotary
  attention and SwiGLU."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  attention: str = "einsum"
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, cos: Optional[Array], sin: Optional[Array]) -> Array:
    """x: (B, N, D) residual stream (float32); emb: (B, D). Returns x's dtype."""
    d = self.hidden_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = Dense(6 * d, kernel_init=_ZEROS, bias_init=_ZEROS, name="adaLN_modulation", **kw)(
        nn.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
        mod[:, None, :], 6, axis=-1)
    h = _modulate(RMSNorm(name="norm1", **kw)(x), shift_msa, scale_msa)
    h = RopeAttention(d, self.num_heads, self.qk_norm, self.attention, name="attn", **kw)(
        h, cos, sin)
    x = x + (gate_msa * h).astype(x.dtype)
    h = _modulate(RMSNorm(name="norm2", **kw)(x), shift_mlp, scale_mlp)
    h = SwiGLU(d, int(2 / 3 * int(d * self.mlp_ratio)), name="mlp", **kw)(h)
    return x + (gate_mlp * h).astype(x.dtype)


class LightningFinalLayer(nn.Module):
  """RMSNorm, adaLN (shift, scale; zero-init), zero-init Dense to p * p * C_out per token."""
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = Dense(2 * self.hidden_size, kernel_init=_ZEROS, bias_init=_ZEROS,
                name="adaLN_modulation", **kw)(nn.silu(emb))
    shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
    x = _modulate(RMSNorm(name="norm_final", **kw)(x), shift, scale)
    return Dense(self.patch_size ** 2 * self.out_channels, kernel_init=_ZEROS,
                 bias_init=_ZEROS, name="linear", **kw)(x)


class LightningDiT(DiT):
  """LightningDiT velocity network u(z, r, t | c) on NHWC latents, class labels only.

  Fields: DiT's (see models/dit.DiT; caption_channels must stay 0, prediction 'velocity'),
  plus use_rope (rotary q, k), qk_norm (RMSNorm of q, k per head), rope_theta. Defaults are
  the published XL/1 on VA-VAE latents: input 16, 32 channels, patch 1. The SiT time
  convention of the published weights is set by the importer's MODEL_FIELDS.
  """
  input_size: int = 16
  in_channels: int = 32
  patch_size: int = 1
  use_rope: bool = True
  qk_norm: bool = False
  rope_theta: float = 10000.0

  @nn.compact
  def __call__(self, z: Array, r: Optional[Array], t: Array, c: Any, *,
               train: bool = False, return_features: bool = False
               ) -> Union[Array, Tuple[Array, List[Array]]]:
    """As DiT.__call__: z (B, H, W, C); r, t (B,); c (B,) labels. Returns the velocity
    (B, H, W, C) float32 [and the feature_layers' block outputs, (B, N, D) float32]."""
    self._check(z)
    if self.is_text or self.prediction != "velocity":
      raise ValueError("LightningDiT is a class-conditional velocity network: "
                       "caption_channels=0 and prediction='velocity'.")
    t = jnp.broadcast_to(to_float(t), (z.shape[0],))
    acc = accumulation_dtype(self.dtype)
    emb, _, _ = self.conditioning(r, t, c, train)
    p, g, d = self.patch_size, self.grid_size, self.hidden_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=_PATCH_INIT,
                bias_init=_ZEROS, dtype=self.dtype, param_dtype=self.param_dtype,
                name="x_embedder")(z)
    x = sharding.constrain_batch(x.reshape(z.shape[0], g * g, d).astype(acc))
    x = x + jnp.asarray(sincos_pos_embed_2d(d, g), acc)[None]
    cos = sin = None
    if self.use_rope:
      cos, sin = (jnp.asarray(a) for a in rope_tables(d // self.num_heads, g, self.rope_theta))

    wanted = self.resolved_feature_layers() if return_features else ()
    fields = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  qk_norm=self.qk_norm, attention=self.attention, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    x, features = apply_blocks(LightningDiTBlock, fields, self.depth, x, (emb, cos, sin),
                               scan=self.scan_blocks, remat=self.remat,
                               remat_policy=self.remat_policy, keep=wanted)
    c_out = self.resolved_out_channels
    out = LightningFinalLayer(d, p, c_out, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="final_layer")(x, emb)
    velocity = unpatchify(out, p, c_out)[..., :self.in_channels].astype(acc)
    if not return_features:
      return velocity
    return velocity, features
