"""SANA transformer (Xie et al. 2024): text-to-image teacher v(z, t | c) and student u(z, r, t | c).

A linear-attention DiT on DC-AE latents (32 channels, 32x down, patch 1): every block is
  h += gate_msa * LinearAttention(adaLN(h))        ReLU kernels, no softmax, cost linear in tokens
  h += CrossAttention(h, caption)                  softmax over caption tokens, no norm/modulation
  h += gate_mlp * GLUMBConv(adaLN(h))              1x1 -> SiLU -> 3x3 depthwise -> GLU -> 1x1
with no position embedding (the 3x3 depthwise conv carries position at 512 and 1024 px). The
condition is adaLN-single: one time embedding, projected once to 6D and added to each block's
learned (6, D) table.

Conventions (ours, METHOD.md): z_t = (1 - t) x + t e, v = e - x, t = 1 noise. SANA's flow sigma is
our t and it predicts noise - x, so nothing is flipped; the network embeds time_scale * t (SANA was
trained on timesteps 1000 * sigma). A student (interval_conditioning=True) adds an interval
embedder h_emb(interval_scale * (t - r)) whose last Dense is zero at init, summed with the time
embedding before the 6D projection, so after `init_student_from_teacher` u(z, r, t | c) equals the
teacher's v(z, t | c) exactly for every r.

Param tree (diffusers' SanaTransformer2DModel names, list indices folded; convert/sana.py):
  patch_embed/{kernel (p, p, C, D), bias}
  t_embedder/{mlp_0 (256, D), mlp_2 (D, D)}/{kernel, bias}     time_embed.emb.timestep_embedder
  interval_embedder/{mlp_0, mlp_2}                              students only; mlp_2 zero at init
  t_block/{kernel (D, 6D), bias}                                time_embed.linear
  caption_projection/{linear_1 (C_txt, D), linear_2 (D, D)}/{kernel, bias}
  caption_norm/scale (D,)
  blocks_{i}/scale_shift_table (6, D)      rows: shift, scale, gate (attn); shift, scale, gate (mlp)
  blocks_{i}/attn1/{to_q, to_k, to_v}/kernel (D, D); attn1/to_out/{kernel, bias}
  blocks_{i}/attn1/{norm_q, norm_k}/scale (D,)                  qk_norm only
  blocks_{i}/attn2/{to_q, to_k, to_v, to_out}/{kernel (D, D), bias}; attn2/{norm_q, norm_k}/scale
  blocks_{i}/ff/conv_inverted/{kernel (D, 2F), bias}; ff/conv_depth/{kernel (3, 3, 1, 2F), bias};
  blocks_{i}/ff/conv_point/kernel (F, D)                        F = int(mlp_ratio * D)
  scale_shift_table (2, D)                                      final adaLN: shift, scale
  proj_out/{kernel (D, p * p * C), bias}
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from hierdistill import sharding
from hierdistill.models.embeddings import (Dense, TimestepEmbedder, accumulation_dtype,
                                          interval_of, to_float)
from hierdistill.models.block_stack import apply_blocks

Array = jax.Array
Dtype = Any

# Published sizes (diffusers scripts/convert_sana_to_diffusers.py; NVlabs sana_multi_scale.py).
# Self-attention heads are 32 wide; cross-attention heads D / cross_num_heads (72 and 112).
SANA_SIZES: Dict[str, Dict[str, int]] = {
    "0.6B": dict(depth=28, hidden_size=1152, num_heads=36, cross_num_heads=16),
    "1.6B": dict(depth=20, hidden_size=2240, num_heads=70, cross_num_heads=20),
    "4.8B": dict(depth=60, hidden_size=2240, num_heads=70, cross_num_heads=20),  # SANA-1.5
}

# diffusers turns padded caption tokens into an additive bias of -10000, not -inf: a caption
# with every token padded then attends uniformly instead of producing NaN.
MASK_BIAS = -10000.0
# The denominator guard of SanaLinearAttnProcessor2_0 (only reached when ReLU zeroes q.k).
LINEAR_ATTENTION_EPS = 1e-15

_XAVIER = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros


def sana_config(name: str) -> Dict[str, int]:
  """Sizes of a published SANA transformer: '0.6B', '1.6B' or '4.8B' ('SANA-' prefix allowed).

  sana_config('0.6B') == {'depth': 28, 'hidden_size': 1152, 'num_heads': 36,
  'cross_num_heads': 16}.
  """
  key = name.strip().upper()
  key = key[len("SANA-"):] if key.startswith("SANA-") else key
  if key not in SANA_SIZES:
    raise ValueError(f"Unknown SANA size {name!r}: valid are {', '.join(SANA_SIZES)}.")
  return dict(SANA_SIZES[key])


def linear_attention(q: Array, k: Array, v: Array, eps: float = LINEAR_ATTENTION_EPS) -> Array:
  """ReLU linear attention: out_n = sum_m (q_n . k_m) v_m / (sum_m q_n . k_m + eps).

  q, k, v: (B, N, H, d), q and k already non-negative (ReLU). Returns (B, N, H, d) in the dtype
  of the inputs. The sums over tokens are taken first (k^T v is (B, H, d, d)), so time and memory
  are linear in N: no (N, N) array exists, in the forward pass or in its JVP.
  """
  # HIGHEST: on TPUs a float32 matmul otherwise runs in bfloat16 passes; these are d x d
  # contractions, cheap next to the projections.
  hi = jax.lax.Precision.HIGHEST
  kv = jnp.einsum("bmhd,bmhe->bhde", k, v, precision=hi)
  k_sum = jnp.sum(k, axis=1)  # (B, H, d)
  num = jnp.einsum("bnhd,bhde->bnhe", q, kv, precision=hi)
  den = jnp.einsum("bnhd,bhd->bnh", q, k_sum, precision=hi)
  return num / (den[..., None] + eps)


class RMSNorm(nn.Module):
  """x / rms(x) * scale (+ bias) over the last axis, computed in float32 at least.

  SANA's caption_norm and qk norms (eps 1e-5, scale only) and DC-AE's norms (scale and bias).
  Returns accumulation_dtype(x.dtype).
  """
  eps: float = 1e-5
  use_bias: bool = False
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.astype(accumulation_dtype(x.dtype))
    dim = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (dim,), self.param_dtype)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    x = x * scale.astype(x.dtype)
    if self.use_bias:
      x = x + self.param("bias", _ZEROS, (dim,), self.param_dtype).astype(x.dtype)
    return x


class GLUMBConv(nn.Module):
  """1x1 conv -> SiLU -> 3x3 depthwise conv -> x * SiLU(gate) -> 1x1 conv, on NHWC maps.

  SANA's feed-forward (no norm, no residual) and DC-AE's EfficientViT block (norm and residual).
  The 1x1 convs are Dense layers (the same product, and sharded like every Dense here).
  Params: conv_inverted/{kernel (C, 2F), bias}, conv_depth/{kernel (3, 3, 1, 2F), bias},
  conv_point/kernel (F, C_out) [, norm/{scale, bias}].
  """
  hidden: int  # F
  out_channels: int
  norm: bool = False
  residual: bool = False
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, H, W, C). Returns (B, H, W, C_out) in the compute dtype (float32 with a norm)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(2 * self.hidden, kernel_init=_XAVIER, bias_init=_ZEROS, name="conv_inverted",
              **kw)(x)
    h = nn.silu(h)
    h = nn.Conv(2 * self.hidden, (3, 3), padding=((1, 1), (1, 1)),
                feature_group_count=2 * self.hidden, bias_init=_ZEROS, name="conv_depth",
                **kw)(h)
    h, gate = jnp.split(h, 2, axis=-1)
    h = Dense(self.out_channels, use_bias=False, kernel_init=_XAVIER, name="conv_point",
              **kw)(h * nn.silu(gate))
    if self.norm:
      h = RMSNorm(1e-5, use_bias=True, param_dtype=self.param_dtype, name="norm")(h)
    return x + h if self.residual else h


def _layer_norm(dtype: Dtype) -> nn.LayerNorm:
  # No affine params: the adaLN table and time projection supply scale and shift.
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


class LinearSelfAttention(nn.Module):
  """SANA's self-attention: q, k, v projections without bias, [RMSNorm on q and k across heads],
  ReLU kernels, linear attention in float32, output projection with bias."""
  hidden_size: int
  num_heads: int
  qk_norm: bool = False
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, N, D). Returns (B, N, D) in the compute dtype."""
    b, n, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: Dense(d, use_bias=False, kernel_init=_XAVIER, name=name, **kw)(x)
    q, k, v = proj("to_q"), proj("to_k"), proj("to_v")
    if self.qk_norm:
      q = RMSNorm(param_dtype=self.param_dtype, name="norm_q")(q)
      k = RMSNorm(param_dtype=self.param_dtype, name="norm_k")(k)
    acc = accumulation_dtype(x.dtype)
    heads = lambda a: a.astype(acc).reshape(b, n, self.num_heads, d // self.num_heads)
    out = linear_attention(nn.relu(heads(q)), nn.relu(heads(k)), heads(v))
    out = out.reshape(b, n, d).astype(self.dtype or acc)
    return Dense(d, kernel_init=_XAVIER, bias_init=_ZEROS, name="to_out", **kw)(out)


class CrossAttention(nn.Module):
  """Softmax attention from image tokens to caption tokens, every projection with bias; padded
  caption tokens get an additive MASK_BIAS. [RMSNorm on q and k across heads.]"""
  hidden_size: int
  num_heads: int
  qk_norm: bool = False
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, caption: Array, bias: Array) -> Array:
    """x: (B, N, D); caption: (B, L, D); bias: (B, L) float, 0 or MASK_BIAS. Returns (B, N, D)
    in the compute dtype."""
    b, n, d = x.shape
    hd = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda name: Dense(d, kernel_init=_XAVIER, bias_init=_ZEROS, name=name, **kw)
    q, k, v = dense("to_q")(x), dense("to_k")(caption), dense("to_v")(caption)
    if self.qk_norm:
      q = RMSNorm(param_dtype=self.param_dtype, name="norm_q")(q).astype(v.dtype)
      k = RMSNorm(param_dtype=self.param_dtype, name="norm_k")(k).astype(v.dtype)
    q = q.reshape(b, n, self.num_heads, hd)
    k = k.reshape(b, -1, self.num_heads, hd)
    v = v.reshape(b, -1, self.num_heads, hd)
    acc = accumulation_dtype(v.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)
    # Softmax in float32 whatever the compute dtype: bf16 logits saturate the exponentials.
    logits = logits * hd ** -0.5 + bias[:, None, None, :].astype(acc)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
    return dense("to_out")(out)


class CaptionProjection(nn.Module):
  """Dense -> GELU(tanh) -> Dense from the text encoder's width to D (PixArt's y_proj)."""
  hidden_size: int
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Array) -> Array:
    """y: (B, L, C_txt). Returns (B, L, D) in the compute dtype."""
    kw = dict(kernel_init=_XAVIER, bias_init=_ZEROS, dtype=self.dtype,
              param_dtype=self.param_dtype)
    h = nn.gelu(Dense(self.hidden_size, name="linear_1", **kw)(y), approximate=True)
    return Dense(self.hidden_size, name="linear_2", **kw)(h)


class SanaBlock(nn.Module):
  """Linear self-attention, cross-attention, GLUMBConv; adaLN-single modulation."""
  hidden_size: int
  num_heads: int
  cross_num_heads: int
  height: int  # token grid, for the depthwise conv
  width: int
  mlp_ratio: float = 2.5
  qk_norm: bool = False
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t6: Array, caption: Array, bias: Array) -> Array:
    """x: (B, N, D) residual stream (float32); t6: (B, 6D) time projection; caption (B, L, D);
    bias (B, L). Returns x's dtype."""
    b, n, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    table = self.param("scale_shift_table",
                       lambda key, shape, dt: jax.random.normal(key, shape, dt) * d ** -0.5,
                       (6, d), self.param_dtype)
    mod = table[None].astype(t6.dtype) + t6.reshape(b, 6, d)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)

    h = _layer_norm(self.dtype)(x) * (1 + scale_msa) + shift_msa
    h = LinearSelfAttention(d, self.num_heads, self.qk_norm, name="attn1", **kw)(h)
    # The residual stream stays float32 (a bf16 stream rounds each of the 3 * depth additions).
    x = x + (gate_msa * h).astype(x.dtype)
    x = x + CrossAttention(d, self.cross_num_heads, self.qk_norm, name="attn2", **kw)(
        x, caption, bias).astype(x.dtype)

    h = _layer_norm(self.dtype)(x) * (1 + scale_mlp) + shift_mlp
    h = h.reshape(b, self.height, self.width, d)
    h = GLUMBConv(int(self.mlp_ratio * d), d, name="ff", **kw)(h).reshape(b, n, d)
    return x + (gate_mlp * h).astype(x.dtype)


TextCondition = Mapping[str, Array]


class SanaTransformer(nn.Module):
  """SANA velocity network u(z, r, t | c) on NHWC DC-AE latents, c a caption embedding.

  Fields:
    in_channels: C of the latents (32 for DC-AE f32c32). Any H, W divisible by patch_size.
    patch_size, hidden_size (D), depth, num_heads (self-attention, D / 32 in the published
      models), cross_num_heads, mlp_ratio: the transformer (see sana_config).
    caption_channels: width of the text encoder's embeddings (Gemma-2-2B: 2304).
    qk_norm: RMSNorm of q and k across heads in both attentions (SANA-1.5, SANA-Sprint).
    interval_conditioning: True for students (adds the zero-init interval embedder).
    feature_layers: block indices (negative counts from the end) whose outputs
      return_features=True returns; None = every block.
    remat: rematerialise each block in the backward pass (memory for compute).
    remat_policy: what a rematerialised block keeps (models/remat.py).
    scan_blocks: one block scanned depth times, params stacked under `blocks`
      (models/block_stack.py): the same numbers, compiled in a fraction of the time.
    dtype: compute dtype of the matmuls (e.g. jnp.bfloat16); param_dtype: storage dtype.
    time_scale: the time embedder reads time_scale * t (SANA: 1000 * sigma).
    interval_scale: the interval embedder reads interval_scale * (t - r).
    frequency_size: sinusoidal features of the time/interval embedders (SANA: 256).
  """
  in_channels: int = 32
  patch_size: int = 1
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 36
  cross_num_heads: int = 16
  mlp_ratio: float = 2.5
  caption_channels: int = 2304
  qk_norm: bool = False
  interval_conditioning: bool = False
  feature_layers: Optional[Tuple[int, ...]] = None
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_blocks: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  time_scale: float = 1000.0
  interval_scale: float = 1000.0
  frequency_size: int = 256

  def resolved_feature_layers(self) -> Tuple[int, ...]:
    """feature_layers as non-negative block indices, validated."""
    layers = tuple(range(self.depth)) if self.feature_layers is None else self.feature_layers
    out = []
    for i in layers:
      if not -self.depth <= i < self.depth:
        raise ValueError(f"feature_layers contains {i}, outside the {self.depth} blocks.")
      out.append(i % self.depth)
    return tuple(out)

  def _check(self, z: Array, c: Any) -> Tuple[Array, Array]:
    for name, heads in (("num_heads", self.num_heads), ("cross_num_heads", self.cross_num_heads)):
      if self.hidden_size % heads:
        raise ValueError(f"hidden_size={self.hidden_size} is not divisible by {name}={heads}.")
    if z.ndim != 4 or z.shape[-1] != self.in_channels:
      raise ValueError(f"SANA expects z of shape (B, H, W, {self.in_channels}) (NHWC); got "
                       f"{z.shape}.")
    if z.shape[1] % self.patch_size or z.shape[2] % self.patch_size:
      raise ValueError(f"z's height and width {z.shape[1:3]} are not divisible by "
                       f"patch_size={self.patch_size}.")
    if not isinstance(c, Mapping) or "embeddings" not in c:
      raise ValueError("SANA's condition c must be a dict {'embeddings': (B, L, "
                       f"{self.caption_channels}), 'mask': (B, L)}}; got {type(c).__name__}.")
    emb = jnp.asarray(c["embeddings"])
    if emb.ndim != 3 or emb.shape[-1] != self.caption_channels or emb.shape[0] != z.shape[0]:
      raise ValueError(f"c['embeddings'] must be (B={z.shape[0]}, L, {self.caption_channels}); "
                       f"got {emb.shape} (caption_channels is the text encoder's width).")
    mask = c.get("mask")
    mask = jnp.ones(emb.shape[:2], jnp.int32) if mask is None else jnp.asarray(mask)
    if mask.shape != emb.shape[:2]:
      raise ValueError(f"c['mask'] must be (B, L) = {emb.shape[:2]}; got {mask.shape}.")
    return emb, mask

  def conditioning(self, r: Optional[Array], t: Array) -> Array:
    """emb = t_emb(time_scale t) [+ h_emb(interval_scale (t - r))]: (B, D) float32. Call from
    __call__ only (its submodules attach to the compact scope)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = TimestepEmbedder(self.hidden_size, self.frequency_size, name="t_embedder", **kw)(
        self.time_scale * t)
    if self.interval_conditioning:
      # Zero output at init: the student's emb is then exactly the teacher's, for every r.
      emb = emb + TimestepEmbedder(self.hidden_size, self.frequency_size, zero_init_output=True,
                                   name="interval_embedder", **kw)(
                                       self.interval_scale * interval_of(r, t))
    return sharding.constrain_batch(emb)

  @nn.compact
  def __call__(self, z: Array, r: Optional[Array], t: Array, c: TextCondition, *,
               train: bool = False, return_features: bool = False
               ) -> Union[Array, Tuple[Array, List[Array]]]:
    """Mean velocity over [r, t] (r = t, or r = None: the instantaneous velocity).

    z: (B, H, W, C) NHWC latents; r, t: (B,) floats in [0, 1] (r is ignored when
    interval_conditioning=False); c: {'embeddings': (B, L, caption_channels) float,
    'mask': (B, L) int or bool, 1 = real token} (mask absent = all real). train: accepted and
    ignored (caption dropout for CFG happens outside the network). Returns the velocity
    (B, H, W, C) float32 (float64 for a float64 model under x64), or (velocity, features) with
    features a list of (B, N, D) block outputs, one per entry of feature_layers, N = H W / p^2.
    """
    del train
    emb_txt, mask = self._check(z, c)
    batch, height, width, _ = z.shape
    t = jnp.broadcast_to(to_float(t), (batch,))
    acc = accumulation_dtype(self.dtype)
    p, d = self.patch_size, self.hidden_size
    gh, gw = height // p, width // p
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=_XAVIER,
                bias_init=_ZEROS, name="patch_embed", **kw)(z)
    x = sharding.constrain_batch(x.reshape(batch, gh * gw, d).astype(acc))

    emb = self.conditioning(r, t)
    t6 = Dense(6 * d, kernel_init=_XAVIER, bias_init=_ZEROS, name="t_block", **kw)(nn.silu(emb))
    t6 = t6.astype(acc)

    cap = CaptionProjection(d, name="caption_projection", **kw)(emb_txt)
    cap = RMSNorm(param_dtype=self.param_dtype, name="caption_norm")(cap)
    cap = cap.astype(self.dtype or acc)
    bias = jnp.where(mask.astype(bool), 0.0, MASK_BIAS).astype(acc)

    wanted = self.resolved_feature_layers() if return_features else ()
    fields = dict(hidden_size=d, num_heads=self.num_heads, cross_num_heads=self.cross_num_heads,
                  height=gh, width=gw, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm, **kw)
    x, features = apply_blocks(SanaBlock, fields, self.depth, x, (t6, cap, bias),
                               scan=self.scan_blocks, remat=self.remat,
                               remat_policy=self.remat_policy, keep=wanted)

    table = self.param("scale_shift_table",
                       lambda key, shape, dt: jax.random.normal(key, shape, dt) * d ** -0.5,
                       (2, d), self.param_dtype)
    shift = table[0].astype(acc) + emb[:, None]
    scale = table[1].astype(acc) + emb[:, None]
    h = _layer_norm(self.dtype)(x) * (1 + scale) + shift
    out = Dense(p * p * self.in_channels, kernel_init=_ZEROS, bias_init=_ZEROS, name="proj_out",
                **kw)(h)
    # Tokens row-major, features (p, q, c): diffusers' unpatchify.
    out = out.reshape(batch, gh, gw, p, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5)
    velocity = out.reshape(batch, height, width, self.in_channels).astype(acc)
    if not return_features:
      return velocity
    return velocity, features
