"""DiT/SiT backbone with (t, t - r) conditioning: teacher v(z, t | y) and student u(z, r, t | y).

One class serves both roles. A teacher (interval_conditioning=False) is a plain DiT; a student
(interval_conditioning=True) adds an interval embedder h_emb(t - r) whose last Dense is zero at
init, and is initialised by models/student.init_student_from_teacher, so at step 0 u(z, r, t | y) equals the
teacher's v(z, t | y) exactly for every r.

The layout follows DiT (Peebles & Xie 2023) so that published DiT/SiT checkpoints map onto it one
parameter at a time (param tree below); only the data layout differs (NHWC here). Param tree:

  x_embedder/{kernel (p, p, C, D), bias}              patch embedding (conv, kernel = stride = p)
  t_embedder/{mlp_0, mlp_2}/{kernel, bias}            time embedder
  interval_embedder/{mlp_0, mlp_2}/{kernel, bias}     students only; mlp_2 zero at init
  y_embedder/embedding_table/embedding (K + 1, D)     labels, row K = null label
  caption_projection/{linear_1, linear_2}             text models only (in place of y_embedder)
  blocks_{i}/adaLN_modulation/{kernel (D, 6D), bias}  order: shift, scale, gate (attn), same (mlp)
  blocks_{i}/attn/{qkv (D, 3D), proj (D, D)}/{kernel, bias}
  blocks_{i}/cross_attn/{q_linear, kv_linear, proj}   text models only (PixArt's names)
  blocks_{i}/mlp/{fc1, fc2}/{kernel, bias}
  final_layer/adaLN_modulation/{kernel (D, 2D), bias}  order: shift, scale
  final_layer/linear/{kernel (D, p*p*C_out), bias}    output channels ordered (p, q, c)

The position embedding is a fixed 2-D sin-cos table (not a param), as in DiT.

Text conditioning (caption_channels > 0) follows PixArt-alpha and SANA: the caption tokens are
projected to the width D (Dense, GELU(tanh), Dense) and every block reads them by
cross-attention between its self-attention and its MLP, on the residual stream itself, padded
tokens masked; adaLN is then modulated by the time (and interval) alone. A label model has
none of these params, so published DiT/SiT trees are unchanged.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hierdistill import sharding
from hierdistill.models import ddpm
from hierdistill.models.embeddings import (Dense, LabelEmbedder, TimestepEmbedder,
                                          accumulation_dtype, interval_of, to_float)
from hierdistill.models.block_stack import apply_blocks

Array = jax.Array
Dtype = Any

# Named sizes of the DiT paper (Table 1); the patch size comes from the name's "/p" suffix.
DIT_SIZES: Dict[str, Dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
_SIZE_NAME = re.compile(r"^(?:(?:dit|sit)-)?(s|b|l|xl)(?:/(\d+))?$", re.IGNORECASE)

ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "auto")
# What the final layer predicts: our velocity e - x, or DiT's DDPM noise (read through the DDPM
# adapter of models/ddpm.py, so that the call still returns our velocity).
PREDICTIONS = ("velocity", "ddpm_noise")

# DiT's initialisers: xavier-uniform Linear kernels with zero bias.
_XAVIER = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros
# The patch conv is initialised as the Linear it is, over the flattened (p * p * C) input: fan_out
# is D, not D * p * p as Flax's conv-aware xavier would count it.
_PATCH_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                               out_axis=-1)

def dit_config(name: str) -> Dict[str, int]:
  """Sizes of a named model: 'S', 'B', 'L', 'XL', optionally '/p' and a 'DiT-'/'SiT-' prefix.

  dit_config('DiT-XL/2') == {'depth': 28, 'hidden_size': 1152, 'num_heads': 16, 'patch_size': 2}.
  Without '/p' the result has no 'patch_size' key.
  """
  match = _SIZE_NAME.match(name.strip())
  if match is None:
    raise ValueError(f"Unknown DiT size {name!r}: expected [DiT-|SiT-]{{{','.join(DIT_SIZES)}}}"
                     f"[/2|/4|/8], e.g. 'DiT-XL/2'.")
  size = dict(DIT_SIZES[match.group(1).upper()])
  if match.group(2) is not None:
    patch = int(match.group(2))
    if patch not in (2, 4, 8):
      raise ValueError(f"Unknown DiT patch size /{patch} in {name!r}: valid are /2, /4, /8.")
    size["patch_size"] = patch
  return size


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> np.ndarray:
  """DiT's fixed 2-D sin-cos position table: (grid_size^2, hidden_size) float32.

  Tokens are numbered row-major (row i, column j -> i * grid_size + j). The first half of the
  features encodes the column j, the second half the row i, each as [sin | cos] over
  hidden_size / 4 frequencies 10000^(-k / (hidden_size / 4)): the exact table DiT/SiT were
  trained with, which importers do not carry (it is a buffer there, a constant here).
  """
  if hidden_size % 4:
    raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 for the 2-D sin-cos "
                     "position embedding.")

  def embed_1d(pos: np.ndarray, dim: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    args = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                           np.arange(grid_size, dtype=np.float64), indexing="ij")
  emb = np.concatenate([embed_1d(cols, hidden_size // 2), embed_1d(rows, hidden_size // 2)], 1)
  return emb.astype(np.float32)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN: x (B, N, D) scaled and shifted per sample by (B, 1, D) arrays."""
  return x * (1 + scale) + shift


def _layer_norm(dtype: Dtype, name: Optional[str] = None) -> nn.LayerNorm:
  # No affine params: adaLN supplies the scale and shift (DiT's elementwise_affine=False).
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (DiT/timm layout).

  implementation: 'einsum' (default) is plain XLA ops with a float32 softmax, which jax.jvp
  traces (MeanFlow's du/dt needs forward mode). 'xla' calls jax.nn.dot_product_attention with
  implementation='xla' (also JVP-safe). 'auto' lets JAX pick a fused kernel (cuDNN on GPU): use it
  only for networks never differentiated in forward mode (e.g. a frozen teacher), since fused
  kernels with a custom_vjp have no JVP (PITFALLS.md).
  """
  hidden_size: int
  num_heads: int
  implementation: str = "einsum"
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, N, D). Returns (B, N, D) in the compute dtype."""
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = Dense(3 * d, kernel_init=_XAVIER, bias_init=_ZEROS, dtype=self.dtype,
                param_dtype=self.param_dtype, name="qkv")(x)
    # (B, N, 3, H, hd): the order of torch's qkv.reshape(B, N, 3, H, hd), so imports map 1:1.
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.implementation == "einsum":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                          preferred_element_type=accumulation_dtype(q.dtype))
      # Softmax in float32 whatever the compute dtype: bf16 logits saturate the exponentials.
      weights = jax.nn.softmax(logits * head_dim ** -0.5, axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      impl = "xla" if self.implementation == "xla" else None
      out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    out = out.reshape(b, n, d)
    return Dense(d, kernel_init=_XAVIER, bias_init=_ZEROS, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="proj")(out)


class CrossAttention(nn.Module):
  """Multi-head attention from the image tokens to the condition tokens, padded ones masked.

  Softmax in float32 over plain XLA ops (JVP-safe, as Attention's 'einsum' path). Its output
  projection starts at zero (as PixArt's), so a new text block adds nothing until it learns to.
  """
  hidden_size: int
  num_heads: int
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, tokens: Array, mask: Array) -> Array:
    """x: (B, N, D) queries; tokens: (B, L, D) keys and values; mask: (B, L), nonzero = real.
    Returns (B, N, D) in the compute dtype."""
    b, n, d = x.shape
    h = self.num_heads
    head_dim = d // h
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = Dense(d, kernel_init=_XAVIER, bias_init=_ZEROS, name="q_linear", **kw)(x)
    kv = Dense(2 * d, kernel_init=_XAVIER, bias_init=_ZEROS, name="kv_linear", **kw)(tokens)
    q = q.reshape(b, n, h, head_dim)
    kv = kv.reshape(b, tokens.shape[1], 2, h, head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=accumulation_dtype(q.dtype)) * head_dim ** -0.5
    # A large finite negative rather than -inf: a row with no real token stays finite (it is
    # never asked for: every encoder here keeps a BOS token), and the JVP has no inf - inf.
    logits = jnp.where(mask[:, None, None, :] != 0, logits, jnp.asarray(-1e9, logits.dtype))
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
    return Dense(d, kernel_init=_ZEROS, bias_init=_ZEROS, name="proj", **kw)(out)


class FeedForward(nn.Module):
  """Dense -> GELU(tanh) -> Dense, DiT's Mlp (params fc1, fc2)."""
  hidden_size: int
  mlp_ratio: float = 4.0
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, N, D). Returns (B, N, D) in the compute dtype."""
    h = Dense(int(self.hidden_size * self.mlp_ratio), kernel_init=_XAVIER, bias_init=_ZEROS,
              dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    h = nn.gelu(h, approximate=True)
    return Dense(self.hidden_size, kernel_init=_XAVIER, bias_init=_ZEROS, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc2")(h)


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block: the modulation Dense starts at zero, so a new block is the
  identity (its gates are 0)."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "einsum"
  cross_num_heads: int = 0  # > 0: cross-attention to the condition tokens (text models)
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, tokens: Optional[Array] = None,
               mask: Optional[Array] = None) -> Array:
    """x: (B, N, D) residual stream (float32); emb: (B, D) adaLN conditioning; tokens, mask:
    (B, L, D) and (B, L) condition tokens of a text model. Returns x's dtype."""
    mod = Dense(6 * self.hidden_size, kernel_init=_ZEROS, bias_init=_ZEROS, dtype=self.dtype,
                param_dtype=self.param_dtype, name="adaLN_modulation")(nn.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
        mod[:, None, :], 6, axis=-1)
    h = _modulate(_layer_norm(self.dtype)(x), shift_msa, scale_msa)
    h = Attention(self.hidden_size, self.num_heads, self.attention, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="attn")(h)
    # The residual stream stays float32: a bf16 stream would round every one of the 2 * depth
    # additions; the matmuls, where the time goes, still run in the compute dtype.
    x = x + (gate_msa * h).astype(x.dtype)
    if self.cross_num_heads:
      x = x + CrossAttention(self.hidden_size, self.cross_num_heads, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="cross_attn")(
                                 x.astype(tokens.dtype), tokens, mask).astype(x.dtype)
    h = _modulate(_layer_norm(self.dtype)(x), shift_mlp, scale_mlp)
    h = FeedForward(self.hidden_size, self.mlp_ratio, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="mlp")(h)
    return x + (gate_mlp * h).astype(x.dtype)


class FinalLayer(nn.Module):
  """adaLN (zero-init) then a zero-init Dense to p * p * C_out per token."""
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    """x: (B, N, D), emb: (B, D). Returns (B, N, p * p * C_out) in the compute dtype."""
    mod = Dense(2 * self.hidden_size, kernel_init=_ZEROS, bias_init=_ZEROS, dtype=self.dtype,
                param_dtype=self.param_dtype, name="adaLN_modulation")(nn.silu(emb))
    shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
    x = _modulate(_layer_norm(self.dtype)(x), shift, scale)
    return Dense(self.patch_size ** 2 * self.out_channels, kernel_init=_ZEROS,
                 bias_init=_ZEROS, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="linear")(x)


class DiT(nn.Module):
  """DiT/SiT velocity network u(z, r, t | c) on NHWC latents, c class labels or text.

  Fields:
    input_size: H = W of the input.           in_channels: C of the input.
    patch_size, hidden_size (D), depth, num_heads, mlp_ratio: the transformer (see dit_config).
    num_classes: K; labels are in [0, K) and K is the null label (the table has K + 1 rows).
    class_dropout_prob: label dropout to the null label when train=True (for CFG). Text models
      do not drop: the stage drops captions to the empty prompt (conditions.py).
    caption_channels: 0 for a class-conditional model; > 0 makes a text model reading
      condition tokens of this width by cross-attention (no label table).
    cross_num_heads: heads of the cross-attention (None: num_heads).
    out_channels: channels of the final layer; None -> in_channels. DiT/SiT checkpoints use
      2 * in_channels ("learn_sigma"); the call then returns only the first in_channels, the
      prediction.
    interval_conditioning: True for students (adds the zero-init interval embedder).
    feature_layers: block indices (negative counts from the end) whose outputs
      return_features=True returns; None = every block.
    remat: rematerialise each block in the backward pass (memory for compute).
    remat_policy: what a rematerialised block keeps (models/remat.py).
    scan_blocks: one block scanned depth times, params stacked under `blocks`, instead of
      depth blocks blocks_{i} (models/block_stack.py): the same numbers, a program the
      compiler compiles in a fraction of the time.
    attention: 'einsum' (default, JVP-safe), 'xla' or 'auto' (see Attention).
    dtype: compute dtype of the matmuls (e.g. jnp.bfloat16); param_dtype: storage dtype.
    time_scale, time_flip: how t reaches the time embedder (see `time_embedding_input`).
    prediction: 'velocity' (ours; SiT's after the importer's sign flip), or 'ddpm_noise': the
      network is a DDPM noise predictor eps(x_s, s | c) (a published DiT) and the call returns
      our velocity through the DDPM adapter (models/ddpm.py): the input is scaled to x_s, the
      embedder reads the DDPM step s(t) (time_scale, time_flip unused), and
      v = (eps - z) / (1 - t). Teachers only: a student is a velocity model (`student_of`).
    interval_scale: the interval embedder reads interval_scale * (t - r).
    frequency_size: number of sinusoidal features of the time/interval embedders (DiT: 256).
  """
  input_size: int = 32
  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  caption_channels: int = 0
  cross_num_heads: Optional[int] = None
  out_channels: Optional[int] = None
  interval_conditioning: bool = False
  feature_layers: Optional[Tuple[int, ...]] = None
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_blocks: bool = False
  attention: str = "einsum"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  time_scale: float = 1000.0
  time_flip: bool = False
  prediction: str = "velocity"
  interval_scale: float = 1000.0
  frequency_size: int = 256

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2

  @property
  def resolved_out_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  def resolved_feature_layers(self) -> Tuple[int, ...]:
    """feature_layers as non-negative block indices, validated."""
    layers = tuple(range(self.depth)) if self.feature_layers is None else self.feature_layers
    out = []
    for i in layers:
      if not -self.depth <= i < self.depth:
        raise ValueError(f"feature_layers contains {i}, outside the {self.depth} blocks.")
      out.append(i % self.depth)
    return tuple(out)

  def time_embedding_input(self, t: Array) -> Array:
    """THE one place mapping our t (t = 1 noise) to the time embedder's input.

    DiT: 1000 t (time_scale=1000). SiT embeds its own t' = 1 - t in [0, 1]: time_scale=1.0,
    time_flip=True. (SiT's velocity x - e is the negative of ours: an importer negates
    final_layer/linear, not this mapping.) A DDPM noise predictor (prediction='ddpm_noise')
    embeds the DDPM step s(t) whose noise-to-signal ratio is ours (models/ddpm.py).
    """
    if self.prediction == "ddpm_noise":
      return ddpm.ddpm_time_of(t)[0]
    t = to_float(t)
    return self.time_scale * ((1.0 - t) if self.time_flip else t)

  def _check(self, z: Array) -> None:
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size={self.input_size} is not divisible by "
                       f"patch_size={self.patch_size}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if self.resolved_out_channels < self.in_channels:
      raise ValueError(f"out_channels={self.out_channels} < in_channels={self.in_channels}.")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention={self.attention!r}; valid: {ATTENTION_IMPLEMENTATIONS}.")
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"prediction={self.prediction!r}; valid: {PREDICTIONS}.")
    if self.prediction != "velocity" and self.interval_conditioning:
      raise ValueError(f"prediction={self.prediction!r} is a teacher's output (a published "
                       "DiT); a student is a velocity model: build it with student_of(teacher).")
    expected = (self.input_size, self.input_size, self.in_channels)
    if z.ndim != 4 or tuple(z.shape[1:]) != expected:
      raise ValueError(f"DiT expects z of shape (B, {expected[0]}, {expected[1]}, "
                       f"{expected[2]}) (NHWC); got {z.shape}.")

  @property
  def is_text(self) -> bool:
    return self.caption_channels > 0

  def conditioning(self, r: Optional[Array], t: Array, c: Any, train: bool
                   ) -> Tuple[Array, Optional[Array], Optional[Array]]:
    """(emb, tokens, mask): emb = t_emb(t) [+ y_emb(y)] [+ h_emb(t - r)], (B, D) float32, the
    adaLN input; for a text model the projected condition tokens (B, L, D) and their mask.
    Call from __call__ only (its submodules attach to the compact scope)."""
    batch = t.shape[0]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = TimestepEmbedder(self.hidden_size, self.frequency_size, name="t_embedder", **kw)(
        self.time_embedding_input(t))
    tokens = mask = None
    if self.is_text:
      if not isinstance(c, dict) or set(c) != {"embeddings", "mask"}:
        raise ValueError("A text DiT (caption_channels > 0) reads c = {'embeddings': (B, L, "
                         f"{self.caption_channels}), 'mask': (B, L)}}; got {_describe(c)}.")
      tokens = CaptionProjection(self.hidden_size, **kw, name="caption_projection")(
          c["embeddings"])
      tokens = sharding.constrain_batch(tokens.astype(accumulation_dtype(self.dtype)))
      mask = c["mask"]
    else:
      emb = emb + LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob,
                                name="y_embedder", **kw)(c, batch, train)
    if self.interval_conditioning:
      # Zero output at init: the student's emb is then exactly the teacher's, for every r.
      emb = emb + TimestepEmbedder(self.hidden_size, self.frequency_size, zero_init_output=True,
                                   name="interval_embedder", **kw)(
                                       self.interval_scale * interval_of(r, t))
    return sharding.constrain_batch(emb), tokens, mask

  @nn.compact
  def __call__(self, z: Array, r: Optional[Array], t: Array, c: Any, *,
               train: bool = False, return_features: bool = False
               ) -> Union[Array, Tuple[Array, List[Array]]]:
    """Mean velocity over [r, t] (with r = t, or r = None: the instantaneous velocity).

    z: (B, H, W, C) NHWC; r, t: (B,) floats in [0, 1] (r = None means r = t; r is ignored when
    interval_conditioning=False: a teacher is a velocity model); c: the condition: (B,) int
    labels, num_classes = null (None = all null), or for a text model {'embeddings': (B, L,
    caption_channels), 'mask': (B, L)} (conditions.py). train=True enables label dropout (needs
    a 'dropout' rng). Returns the velocity (B, H, W, C) float32, or (velocity, features) with features a list
    of (B, N, D) float32 block outputs, one per entry of feature_layers, N = (H / p)^2. (float32
    whatever the compute dtype; float64 only for a model with dtype=float64 under x64.)
    """
    self._check(z)
    t = jnp.broadcast_to(to_float(t), (z.shape[0],))
    acc = accumulation_dtype(self.dtype)  # float32 (float64 for a float64 model)
    emb, tokens, mask = self.conditioning(r, t, c, train)
    p, g, d = self.patch_size, self.grid_size, self.hidden_size

    z_in = z
    if self.prediction == "ddpm_noise":  # the DDPM point x_s = sqrt(abar_s) / (1 - t) z_t
      _, scale, t_clipped = ddpm.ddpm_time_of(t)
      z_in = z * scale.reshape(-1, 1, 1, 1).astype(z.dtype)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=_PATCH_INIT,
                bias_init=_ZEROS, dtype=self.dtype, param_dtype=self.param_dtype,
                name="x_embedder")(z_in)
    # The patch conv is a dot over (p, p, C) with a sharded kernel, like the Dense layers.
    x = sharding.constrain_batch(x.reshape(z.shape[0], g * g, d).astype(acc))
    x = x + jnp.asarray(sincos_pos_embed_2d(d, g), acc)[None]

    wanted = self.resolved_feature_layers() if return_features else ()
    fields = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  attention=self.attention,
                  cross_num_heads=(self.cross_num_heads or self.num_heads) if self.is_text else 0,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    x, features = apply_blocks(DiTBlock, fields, self.depth, x, (emb, tokens, mask),
                               scan=self.scan_blocks, remat=self.remat,
                               remat_policy=self.remat_policy, keep=wanted)

    c_out = self.resolved_out_channels
    out = FinalLayer(d, p, c_out, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="final_layer")(x, emb)
    velocity = unpatchify(out, p, c_out)[..., :self.in_channels].astype(acc)
    if self.prediction == "ddpm_noise":  # eps -> v = (eps - z) / (1 - t) (models/ddpm.py)
      velocity = (velocity - z.astype(acc)) / (1.0 - t_clipped.astype(acc)).reshape(-1, 1, 1, 1)
    if not return_features:
      return velocity
    return velocity, features


class CaptionProjection(nn.Module):
  """Condition tokens to the model width: Dense -> GELU(tanh) -> Dense (PixArt's y_embedder,
  SANA's caption_projection; params linear_1, linear_2)."""
  hidden_size: int
  dtype: Optional[Dtype] = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.hidden_size, kernel_init=_XAVIER, bias_init=_ZEROS, name="linear_1", **kw)(
        tokens)
    h = nn.gelu(h, approximate=True)
    return Dense(self.hidden_size, kernel_init=_XAVIER, bias_init=_ZEROS, name="linear_2",
                 **kw)(h)


def _describe(c: Any) -> str:
  if isinstance(c, dict):
    return "a dict with keys " + ", ".join(sorted(map(str, c)))
  return f"{type(c).__name__} of shape {getattr(c, 'shape', '?')}"


def unpatchify(x: Array, patch_size: int, channels: int) -> Array:
  """(B, N, p * p * C) tokens, features ordered (p, q, c) as DiT's, -> (B, H, W, C) NHWC."""
  b, n, _ = x.shape
  g = int(round(n ** 0.5))
  x = x.reshape(b, g, g, patch_size, patch_size, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, row, p, col, q, C)
  return x.reshape(b, g * patch_size, g * patch_size, channels)
