"""The KL autoencoder of Stable Diffusion ("SD-VAE"), in Flax, NHWC: images <-> latents.

The ImageNet 256 teachers (DiT, SiT) were trained on latents of stabilityai/sd-vae-ft-ema (or
ft-mse): a 256x256x3 image in [-1, 1] -> a 32x32x4 latent, multiplied by scaling_factor 0.18215
before the diffusion model sees it (PITFALLS.md: pin which VAE, ft-EMA or ft-MSE, made the
latents). The module tree mirrors diffusers' AutoencoderKL so that convert/vae.py maps every
weight one to one ('.' -> '/', list indices -> '_{i}'):

  encoder/conv_in, encoder/down_blocks_{i}/resnets_{j}/{norm1, conv1, norm2, conv2,
    conv_shortcut}, encoder/down_blocks_{i}/downsamplers_0/conv,
    encoder/mid_block/{resnets_0, attentions_0/{group_norm, to_q, to_k, to_v, to_out_0},
    resnets_1}, encoder/conv_norm_out, encoder/conv_out
  quant_conv, post_quant_conv (1x1)
  decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/resnets_{j}/...,
    decoder/up_blocks_{i}/upsamplers_0/conv, decoder/conv_norm_out, decoder/conv_out

LDM's autoencoders (VA-VAE among them) are the same network, with optionally one attention
after every resnet of some levels (LDM's attn_resolutions): `attention_levels` names those
levels (encoder order, 0 = full resolution); their attentions are down_blocks_{i}/attentions_{j}
and, in the decoder, up_blocks_{L - 1 - i}/attentions_{j} (diffusers' AttnDown/UpDecoder names).

Use:
  vae = AutoencoderKL()                    # SD-VAE sizes
  mean, logvar = vae.apply(v, x, method=AutoencoderKL.encode)        # x (B, 256, 256, 3)
  latents = vae.scaling_factor * mean     # what the diffusion model sees
  images = vae.apply(v, latents / vae.scaling_factor, method=AutoencoderKL.decode)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
Dtype = Any

# sd-vae-ft-ema's published config (the one Stable Diffusion 1.x uses).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
              scaling_factor=0.18215)
# VA-VAE f16d32 (hustvl/LightningDiT tokenizer/configs/vavae_f16d32.yaml: ch 128, ch_mult
# (1, 1, 2, 2, 4), z 32, attention at resolution 16 = level 4 of a 256 input). It has no scalar
# scaling factor: LightningDiT normalises its latents per channel (latents_stats.pt).
VA_VAE_F16D32 = dict(in_channels=3, out_channels=3, latent_channels=32,
                     block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2,
                     norm_num_groups=32, scaling_factor=1.0, attention_levels=(4,))


def _group_norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits on the large activations of a decoder.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                      name=name)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  pad = ((kernel // 2, kernel // 2),) * 2 if padding == "SAME" else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 conv when channels change) shortcut."""
  out_channels: int
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """One-head self-attention over the H * W positions, GroupNorm first, residual after (the
  VAE's mid-block attention: heads = channels // attention_head_dim = 1)."""
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hgt, wid, c = x.shape
    h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, hgt * wid, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    # float32 softmax (diffusers' upcast_softmax=True).
    weights = jax.nn.softmax(logits * c ** -0.5, axis=-1).astype(v.dtype)
    out = dense("to_out_0")(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x + out.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  channels: int
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
    x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """conv3x3 with stride 2 after padding one row and column at the bottom and right only (the
  published VAE's asymmetric padding; a symmetric SAME pad would shift every latent)."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x, then conv3x3."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, self.dtype, "conv")(x)


class DownBlock(nn.Module):
  """layers resnets (each followed by an attention with `attention`), then a Downsample unless
  it is the last level."""
  channels: int
  layers: int
  downsample: bool
  groups: int = 32
  dtype: Dtype = jnp.float32
  attention: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.layers):
      x = ResnetBlock(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
      if self.attention:
        x = SpatialSelfAttention(self.groups, self.dtype, name=f"attentions_{j}")(x)
    if self.downsample:
      x = Downsample(self.channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  """layers resnets (each followed by an attention with `attention`), then an Upsample unless
  it is the last level."""
  channels: int
  layers: int
  upsample: bool
  groups: int = 32
  dtype: Dtype = jnp.float32
  attention: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.layers):
      x = ResnetBlock(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
      if self.attention:
        x = SpatialSelfAttention(self.groups, self.dtype, name=f"attentions_{j}")(x)
    if self.upsample:
      x = Upsample(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  out_channels: int  # 2 * latent channels: mean and log-variance
  block_out_channels: Tuple[int, ...]
  layers_per_block: int = 2
  groups: int = 32
  dtype: Dtype = jnp.float32
  attention_levels: Tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    chans = self.block_out_channels
    x = _conv(chans[0], 3, self.dtype, "conv_in")(x)
    for i, c in enumerate(chans):
      x = DownBlock(c, self.layers_per_block, i < len(chans) - 1, self.groups, self.dtype,
                    i in self.attention_levels, name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], self.groups, self.dtype, name="mid_block")(x)
    x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  out_channels: int
  block_out_channels: Tuple[int, ...]
  layers_per_block: int = 2
  groups: int = 32
  dtype: Dtype = jnp.float32
  attention_levels: Tuple[int, ...] = ()  # encoder order: up block i is level L - 1 - i

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chans = tuple(reversed(self.block_out_channels))
    x = _conv(chans[0], 3, self.dtype, "conv_in")(z)
    x = MidBlock(chans[0], self.groups, self.dtype, name="mid_block")(x)
    for i, c in enumerate(chans):
      # One more resnet per level than the encoder has.
      x = UpBlock(c, self.layers_per_block + 1, i < len(chans) - 1, self.groups, self.dtype,
                  len(chans) - 1 - i in self.attention_levels, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """SD-VAE. encode: images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, 4),
  f = 2^(len(block_out_channels) - 1); decode: unscaled latents -> images (about [-1, 1]).

  scaling_factor is not applied inside: callers multiply the mean (or a sample) by it before
  the diffusion model and divide before decode, as the published pipelines do.
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = SD_VAE["block_out_channels"]
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  dtype: Dtype = jnp.float32
  attention_levels: Tuple[int, ...] = ()  # LDM's attn_resolutions as level indices
  # Per-channel latent statistics (LightningDiT's latents_stats.pt for VA-VAE); None: 0 and 1.
  latent_mean: Optional[Tuple[float, ...]] = None
  latent_std: Optional[Tuple[float, ...]] = None

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    chans = tuple(self.block_out_channels)
    levels = tuple(self.attention_levels)
    self.encoder = Encoder(2 * self.latent_channels, chans, self.layers_per_block,
                           self.norm_num_groups, self.dtype, levels)
    self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)
    self.decoder = Decoder(self.out_channels, chans, self.layers_per_block,
                           self.norm_num_groups, self.dtype, levels)

  def encode(self, x: Array) -> Tuple[Array, Array]:
    """(mean, logvar) float32 of the diagonal Gaussian posterior; logvar clamped to [-30, 20]
    as in the published code."""
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """Images float32 from unscaled latents z (divide the model's latents by scaling_factor)."""
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction from the posterior mean (init and tests touch every param this way)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def latent_affine(vae) -> Tuple[Array, Array]:
  """(scale, shift), each (C,) float32: what the diffusion model sees is scale * z + shift for
  an unscaled VAE latent z. SD-VAE: scaling_factor and 0. With per-channel statistics
  (LightningDiT on VA-VAE): scaling_factor * (z - mean) / std."""
  c = vae.latent_channels
  mean = jnp.zeros((c,)) if vae.latent_mean is None else jnp.asarray(vae.latent_mean)
  std = jnp.ones((c,)) if vae.latent_std is None else jnp.asarray(vae.latent_std)
  scale = vae.scaling_factor / std
  return scale.astype(jnp.float32), (-mean * scale).astype(jnp.float32)


def unscale_latents(vae, x: Array) -> Array:
  """The VAE latent z of the model's x = scale * z + shift (latent_affine): what decode reads."""
  scale, shift = latent_affine(vae)
  return (x - shift) / scale


def sample_latents(key: Array, mean: Array, logvar: Array, scaling_factor: float) -> Array:
  """scaling_factor * (mean + std * e): one draw of the posterior, as DiT/SiT trained on."""
  std = jnp.exp(0.5 * logvar)
  return scaling_factor * (mean + std * jax.random.normal(key, mean.shape, mean.dtype))
