"""LDM's KL autoencoder (the network of VA-VAE: hustvl/LightningDiT tokenizer/autoencoder.py,
itself LDM's) restated in PyTorch for tests, with the module names of its checkpoints:
encoder/decoder.{conv_in, down.{i}.block.{j}, down.{i}.attn.{j}, down.{i}.downsample,
mid.{block_1, attn_1, block_2}, up.{i}..., norm_out, conv_out}, quant_conv, post_quant_conv.
GroupNorm(32, eps 1e-6) everywhere; resnets with nin_shortcut (1x1) when channels change;
attention = 1x1 convs q, k, v, proj_out, one head, softmax(q k^T / sqrt(C)); downsampling pads
(0, 1, 0, 1) then a stride-2 3x3 conv; upsampling nearest 2x then a 3x3 conv. An attention
follows every resnet of the levels whose resolution is in attn_resolutions.
"""
import torch
from torch import nn
import torch.nn.functional as F


def norm(c):
  return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
    self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.norm = norm(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    h = self.norm(x)
    b, c, hh, ww = h.shape
    q = self.q(h).reshape(b, c, -1).permute(0, 2, 1)
    k = self.k(h).reshape(b, c, -1)
    w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
    v = self.v(h).reshape(b, c, -1)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + self.proj_out(out)


class Downsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
    super().__init__()
    self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
    self.down = nn.ModuleList()
    res, cin = resolution, ch
    for i, m in enumerate(ch_mult):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks):
        level.block.append(ResnetBlock(cin, ch * m))
        cin = ch * m
        if res in attn_resolutions:
          level.attn.append(AttnBlock(cin))
      if i != len(ch_mult) - 1:
        level.downsample = Downsample(cin)
        res //= 2
      self.down.append(level)
    self.mid = nn.Module()
    self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
        ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin))
    self.norm_out = norm(cin)
    self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
    super().__init__()
    cin = ch * ch_mult[-1]
    res = resolution // 2 ** (len(ch_mult) - 1)
    self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
    self.mid = nn.Module()
    self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
        ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin))
    self.up = nn.ModuleList([None] * len(ch_mult))
    for i in reversed(range(len(ch_mult))):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        level.block.append(ResnetBlock(cin, ch * ch_mult[i]))
        cin = ch * ch_mult[i]
        if res in attn_resolutions:
          level.attn.append(AttnBlock(cin))
      if i != 0:
        level.upsample = Upsample(cin)
        res *= 2
      self.up[i] = level
    self.norm_out = norm(cin)
    self.conv_out = nn.Conv2d(cin, 3, 3, 1, 1)

  def forward(self, z):
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
    for i in reversed(range(len(self.up))):
      level = self.up[i]
      for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
  """encode(x NCHW in [-1, 1]) -> (mean, logvar clamped to [-30, 20]); decode(z) -> images."""

  def __init__(self, embed_dim=32, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
               attn_resolutions=(16,), resolution=256):
    super().__init__()
    kw = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
              attn_resolutions=attn_resolutions, resolution=resolution, z_channels=embed_dim)
    self.encoder = Encoder(**kw)
    self.decoder = Decoder(**kw)
    self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

  def encode(self, x):
    mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))
