"""DC-AE, the deep-compression autoencoder of SANA (Chen et al. 2024), in Flax, NHWC.

f32c32: a 1024 x 1024 x 3 image in [-1, 1] <-> a 32 x 32 x 32 latent. SANA's transformer reads
scaling_factor * latent (0.41407 for dc-ae-f32c32-sana-1.0 and -1.1) and its samples are decoded
from latent / scaling_factor. The encoder is deterministic (no posterior).

Each resolution stage is a run of blocks, ResBlocks in the high-resolution stages and EfficientViT
blocks (multi-scale ReLU linear attention, then a GLUMBConv) in the low-resolution ones. Every
change of resolution has a parameter-free shortcut beside its conv: pixel-unshuffle then channel
averaging going down, channel repetition then pixel-shuffle going up, and the same averaging /
repetition around the latent (so the convs learn residuals of a space-to-channel reshuffle).

The module tree mirrors diffusers' AutoencoderDC so that convert/dcae.py maps every weight one to
one ('.' -> '/', list indices folded into the name, 'weight' -> kernel, or scale for norms):
  encoder/conv_in; encoder/down_blocks_{i}_{j} (j < layers: a block; j = layers: the
    downsampler, whose conv is down_blocks_{i}_{j}/conv); encoder/conv_out
  decoder/conv_in; decoder/up_blocks_{i}_0 (the upsampler, when stage i < last) then the stage's
    blocks; decoder/norm_out; decoder/conv_out
  ResBlock: conv1, conv2, norm.   EfficientViT block: attn/{to_q, to_k, to_v,
    to_qkv_multiscale_{s}/{proj_in, proj_out}, to_out, norm_out}, conv_out/{conv_inverted,
    conv_depth, conv_point, norm}.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from hierdistill.models.sana import GLUMBConv, RMSNorm, linear_attention

Array = jax.Array
Dtype = Any

# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (and -1.1, the same architecture): diffusers'
# scripts/convert_dcae_to_diffusers.py and the published config.json.
DCAE_F32C32 = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="Conv", upsample_block_type="interpolate",
    decoder_norm_types=("rms_norm",) * 6, decoder_act_fns=("silu",) * 6,
    encoder_out_shortcut=True, decoder_in_shortcut=True, decoder_conv_act_fn="relu",
    scaling_factor=0.41407)

ACTIVATIONS: Dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu, "swish": nn.silu, "relu": nn.relu, "gelu": lambda x: nn.gelu(x, False)}
BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
# The denominator guard of diffusers' SanaMultiscaleLinearAttention.
ATTENTION_EPS = 1e-15


def pixel_unshuffle(x: Array) -> Array:
  """(B, H, W, C) -> (B, H/2, W/2, 4C), channel c * 4 + 2 i + j holding pixel (2h + i, 2w + j) of
  channel c: torch's pixel_unshuffle order, so the channel averaging groups the same values."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def pixel_shuffle(x: Array) -> Array:
  """The inverse of pixel_unshuffle: (B, H, W, 4C) -> (B, 2H, 2W, C)."""
  b, h, w, c4 = x.shape
  x = x.reshape(b, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, 2 * h, 2 * w, c4 // 4)


def average_channels(x: Array, channels: int) -> Array:
  """Means over consecutive groups of channels: (..., C) -> (..., channels)."""
  return jnp.mean(x.reshape(x.shape[:-1] + (channels, x.shape[-1] // channels)), axis=-1)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
          use_bias: bool = True, groups: int = 1) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=use_bias,
                 dtype=dtype, name=name)


def _rms_norm(name: str) -> RMSNorm:
  return RMSNorm(1e-5, use_bias=True, name=name)


class ResBlock(nn.Module):
  """conv3x3 -> act -> conv3x3 (no bias) -> RMSNorm over channels, plus the input."""
  channels: int
  act: str = "silu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _conv(self.channels, 3, self.dtype, "conv1")(x)
    h = _conv(self.channels, 3, self.dtype, "conv2", use_bias=False)(ACTIVATIONS[self.act](h))
    return x + _rms_norm("norm")(h).astype(x.dtype)


class MultiscaleProjection(nn.Module):
  """A k x k depthwise conv, then a 1x1 conv within each group of head_dim channels (no bias)."""
  channels: int
  groups: int
  kernel: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = _conv(self.channels, self.kernel, self.dtype, "proj_in", use_bias=False,
              groups=self.channels)(x)
    return _conv(self.channels, 1, self.dtype, "proj_out", use_bias=False, groups=self.groups)(x)


class MultiscaleLinearAttention(nn.Module):
  """EfficientViT's attention: q, k, v by 1x1 projections, plus for each scale s a k_s x k_s
  depthwise conv and a grouped 1x1 conv of the concatenated qkv (the local "multi-scale" tokens);
  ReLU linear attention within each group of 3 x head_dim channels; 1x1 out, RMSNorm, residual.

  Groups follow the channel order of the concatenation [q | k | v | scale-1 q | k | v | ...]:
  group g reads channels [3 d g, 3 d (g + 1)) as its (q, k, v), which is diffusers' reshape to
  (B, -1, 3 d, H W), not a split of q, k, v into heads.
  """
  channels: int
  head_dim: int = 32
  scales: Tuple[int, ...] = (5,)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, _ = x.shape
    heads = self.channels // self.head_dim
    inner = heads * self.head_dim
    dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)
    qkv = jnp.concatenate([dense("to_q")(x), dense("to_k")(x), dense("to_v")(x)], axis=-1)
    branches = [qkv] + [
        MultiscaleProjection(3 * inner, 3 * heads, kernel, self.dtype,
                             name=f"to_qkv_multiscale_{s}")(qkv)
        for s, kernel in enumerate(self.scales)]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    groups = jnp.concatenate(branches, axis=-1).astype(acc).reshape(b, h * w, -1, 3,
                                                                     self.head_dim)
    q, k, v = nn.relu(groups[..., 0, :]), nn.relu(groups[..., 1, :]), groups[..., 2, :]
    # diffusers switches to the (N, N) form when H W <= head_dim, in the compute dtype: the same
    # quotient, so one formula serves both (they agree to float32 rounding).
    out = linear_attention(q, k, v, ATTENTION_EPS).reshape(b, h, w, -1).astype(self.dtype)
    out = nn.Dense(self.channels, use_bias=False, dtype=self.dtype, name="to_out")(out)
    return x + _rms_norm("norm_out")(out).astype(x.dtype)


class EfficientViTBlock(nn.Module):
  """Multi-scale linear attention, then GLUMBConv (expand 4, RMSNorm, residual)."""
  channels: int
  head_dim: int = 32
  scales: Tuple[int, ...] = (5,)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = MultiscaleLinearAttention(self.channels, self.head_dim, self.scales, self.dtype,
                                  name="attn")(x)
    return GLUMBConv(4 * self.channels, self.channels, norm=True, residual=True,
                     dtype=self.dtype, name="conv_out")(x).astype(x.dtype)


class DownBlock(nn.Module):
  """Halves H and W: a stride-2 conv3x3 ('Conv') or a conv3x3 then pixel-unshuffle
  ('pixel_unshuffle'), plus pixel-unshuffle then channel averaging of the input."""
  channels: int
  pixel_unshuffle: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.pixel_unshuffle:
      y = pixel_unshuffle(_conv(self.channels // 4, 3, self.dtype, "conv")(x))
    else:
      y = _conv(self.channels, 3, self.dtype, "conv", stride=2)(x)
    return y + average_channels(pixel_unshuffle(x), self.channels)


class UpBlock(nn.Module):
  """Doubles H and W: nearest 2x then conv3x3 ('interpolate') or a conv3x3 then pixel-shuffle
  ('pixel_shuffle'), plus channel repetition then pixel-shuffle of the input."""
  channels: int
  interpolate: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.interpolate:
      y = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      y = _conv(self.channels, 3, self.dtype, "conv")(y)
    else:
      y = pixel_shuffle(_conv(4 * self.channels, 3, self.dtype, "conv")(x))
    repeats = 4 * self.channels // x.shape[-1]
    return y + pixel_shuffle(jnp.repeat(x, repeats, axis=-1))


def _block(kind: str, channels: int, head_dim: int, scales: Tuple[int, ...], act: str,
           dtype: Dtype, name: str) -> nn.Module:
  if kind == "ResBlock":
    return ResBlock(channels, act, dtype, name=name)
  return EfficientViTBlock(channels, head_dim, tuple(scales), dtype, name=name)


class DCEncoder(nn.Module):
  """Images (B, H, W, in_channels) -> unscaled latents (B, H / f, W / f, latent_channels)."""
  latent_channels: int
  block_types: Tuple[str, ...]
  block_out_channels: Tuple[int, ...]
  layers_per_block: Tuple[int, ...]
  qkv_multiscales: Tuple[Tuple[int, ...], ...]
  head_dim: int = 32
  pixel_unshuffle: bool = False
  out_shortcut: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    chans = self.block_out_channels
    x = _conv(chans[0], 3, self.dtype, "conv_in")(x)
    for i, (c, layers) in enumerate(zip(chans, self.layers_per_block)):
      for j in range(layers):
        x = _block(self.block_types[i], c, self.head_dim, self.qkv_multiscales[i], "silu",
                   self.dtype, f"down_blocks_{i}_{j}")(x)
      if i < len(chans) - 1:
        x = DownBlock(chans[i + 1], self.pixel_unshuffle, self.dtype,
                      name=f"down_blocks_{i}_{layers}")(x)
    out = _conv(self.latent_channels, 3, self.dtype, "conv_out")(x)
    return out + average_channels(x, self.latent_channels) if self.out_shortcut else out


class DCDecoder(nn.Module):
  """Unscaled latents (B, h, w, latent_channels) -> images (B, f h, f w, out_channels)."""
  out_channels: int
  block_types: Tuple[str, ...]
  block_out_channels: Tuple[int, ...]
  layers_per_block: Tuple[int, ...]
  qkv_multiscales: Tuple[Tuple[int, ...], ...]
  act_fns: Tuple[str, ...]
  head_dim: int = 32
  interpolate: bool = True
  in_shortcut: bool = True
  conv_act: str = "relu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chans = self.block_out_channels
    x = _conv(chans[-1], 3, self.dtype, "conv_in")(z)
    if self.in_shortcut:
      x = x + jnp.repeat(z, chans[-1] // z.shape[-1], axis=-1)
    for i in reversed(range(len(chans))):
      j0 = 0
      if i < len(chans) - 1:
        x = UpBlock(chans[i], self.interpolate, self.dtype, name=f"up_blocks_{i}_0")(x)
        j0 = 1
      for j in range(self.layers_per_block[i]):
        x = _block(self.block_types[i], chans[i], self.head_dim, self.qkv_multiscales[i],
                   self.act_fns[i], self.dtype, f"up_blocks_{i}_{j0 + j}")(x)
    x = ACTIVATIONS[self.conv_act](_rms_norm("norm_out")(x).astype(x.dtype))
    return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderDC(nn.Module):
  """DC-AE. encode: images (B, H, W, in_channels) in [-1, 1] -> latents (B, H / f, W / f,
  latent_channels), f = 2^(stages - 1) (32 for f32c32); decode: latents -> images.

  Both work on unscaled latents; SANA's latents are scaling_factor * encode(x), and its samples
  decode(z / scaling_factor). Fields are diffusers' AutoencoderDC config keys, one entry per stage
  where diffusers accepts a string for all (see DCAE_F32C32). Supported: block types ResBlock and
  EfficientViTBlock, rms_norm decoder norms, at least one block in every stage (the published
  SANA autoencoders); convert/dcae.py refuses other configs with a one-line error.
  """
  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: Tuple[str, ...] = DCAE_F32C32["encoder_block_types"]
  decoder_block_types: Tuple[str, ...] = DCAE_F32C32["decoder_block_types"]
  encoder_block_out_channels: Tuple[int, ...] = DCAE_F32C32["encoder_block_out_channels"]
  decoder_block_out_channels: Tuple[int, ...] = DCAE_F32C32["decoder_block_out_channels"]
  encoder_layers_per_block: Tuple[int, ...] = DCAE_F32C32["encoder_layers_per_block"]
  decoder_layers_per_block: Tuple[int, ...] = DCAE_F32C32["decoder_layers_per_block"]
  encoder_qkv_multiscales: Tuple[Tuple[int, ...], ...] = DCAE_F32C32["encoder_qkv_multiscales"]
  decoder_qkv_multiscales: Tuple[Tuple[int, ...], ...] = DCAE_F32C32["decoder_qkv_multiscales"]
  downsample_block_type: str = "Conv"
  upsample_block_type: str = "interpolate"
  decoder_norm_types: Tuple[str, ...] = DCAE_F32C32["decoder_norm_types"]
  decoder_act_fns: Tuple[str, ...] = DCAE_F32C32["decoder_act_fns"]
  encoder_out_shortcut: bool = True
  decoder_in_shortcut: bool = True
  decoder_conv_act_fn: str = "relu"
  scaling_factor: float = 0.41407
  dtype: Dtype = jnp.float32

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.encoder_block_out_channels) - 1)

  def check(self) -> None:
    """Raises one line naming the field this implementation does not support."""
    for side in ("encoder", "decoder"):
      n = len(getattr(self, f"{side}_block_out_channels"))
      for field in ("block_types", "layers_per_block", "qkv_multiscales"):
        value = getattr(self, f"{side}_{field}")
        if len(value) != n:
          raise ValueError(f"AutoencoderDC {side}_{field}={value} has {len(value)} entries for "
                           f"{n} stages.")
      if any(k not in BLOCK_TYPES for k in getattr(self, f"{side}_block_types")):
        raise ValueError(f"AutoencoderDC {side}_block_types={getattr(self, f'{side}_block_types')}"
                         f": supported are {BLOCK_TYPES}.")
      if min(getattr(self, f"{side}_layers_per_block")) < 1:
        raise ValueError(f"AutoencoderDC {side}_layers_per_block="
                         f"{getattr(self, f'{side}_layers_per_block')}: stages without blocks "
                         "(the f64/f128 'in'/'mix' models) are not supported.")
    if any(n != "rms_norm" for n in self.decoder_norm_types):
      raise ValueError(f"AutoencoderDC decoder_norm_types={self.decoder_norm_types}: only "
                       "'rms_norm' is supported (batch_norm needs running statistics).")
    for act in tuple(self.decoder_act_fns) + (self.decoder_conv_act_fn,):
      if act not in ACTIVATIONS:
        raise ValueError(f"AutoencoderDC activation {act!r}: supported are {tuple(ACTIVATIONS)}.")

  def setup(self) -> None:
    self.check()
    self.encoder = DCEncoder(
        self.latent_channels, tuple(self.encoder_block_types),
        tuple(self.encoder_block_out_channels), tuple(self.encoder_layers_per_block),
        tuple(tuple(s) for s in self.encoder_qkv_multiscales), self.attention_head_dim,
        self.downsample_block_type == "pixel_unshuffle", self.encoder_out_shortcut, self.dtype)
    self.decoder = DCDecoder(
        self.in_channels, tuple(self.decoder_block_types),
        tuple(self.decoder_block_out_channels), tuple(self.decoder_layers_per_block),
        tuple(tuple(s) for s in self.decoder_qkv_multiscales), tuple(self.decoder_act_fns),
        self.attention_head_dim, self.upsample_block_type == "interpolate",
        self.decoder_in_shortcut, self.decoder_conv_act_fn, self.dtype)

  def encode(self, x: Array) -> Array:
    """x: (B, H, W, in_channels), H and W multiples of f. Returns unscaled latents, float32."""
    f = self.downsampling_factor
    if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"DC-AE encodes (B, H, W, {self.in_channels}) images with H and W "
                       f"multiples of {f}; got {x.shape}.")
    return self.encoder(x).astype(jnp.float32)

  def decode(self, z: Array) -> Array:
    """z: (B, h, w, latent_channels) unscaled. Returns (B, f h, f w, in_channels) float32."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"DC-AE decodes (B, h, w, {self.latent_channels}) latents; got "
                       f"{z.shape}.")
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """decode(encode(x)): what init traces, so that both halves get params."""
    return self.decode(self.encode(x))
