"""DiT (Peebles & Xie 2023) in PyTorch, with the module names of the published checkpoints, so
that `state_dict()` has exactly their keys. SiT (Ma et al. 2024) is the same network: only how
its time input and output are read differs.

Not diffusers' DiTTransformer2DModel: diffusers builds its time features with
downscale_freq_shift=1, i.e. frequencies 10000^(-k / 127) where DiT uses 10000^(-k / 128), so
its outputs differ from the published model's.
"""
import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def sincos_table(dim: int, grid: int) -> np.ndarray:
  """(grid^2, dim): first half encodes the column, second half the row, each [sin | cos]."""
  def one_axis(pos, d):
    freqs = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
    ang = pos.reshape(-1)[:, None] * freqs[None]
    return np.concatenate([np.sin(ang), np.cos(ang)], 1)
  cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  return np.concatenate([one_axis(cols, dim // 2), one_axis(rows, dim // 2)], 1)


def frequency_features(t: torch.Tensor, dim: int) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
  ang = t.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(ang), torch.sin(ang)], -1)


class PatchEmbed(nn.Module):
  def __init__(self, patch, in_ch, dim):
    super().__init__()
    self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
  def __init__(self, dim, freq=256):
    super().__init__()
    self.freq = freq
    self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t):
    return self.mlp(frequency_features(t, self.freq))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, dim):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, dim)  # row num_classes: null label

  def forward(self, y):
    return self.embedding_table(y)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
  def __init__(self, dim, heads, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, c):
    s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, c1))
    return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, c2))


class FinalLayer(nn.Module):
  def __init__(self, dim, patch, out_ch):
    super().__init__()
    self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(dim, patch * patch * out_ch)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
  """forward(x NCHW, t (B,) as the embedder reads it, y (B,)) -> (B, 2C, H, W) (learn_sigma)."""

  def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
               num_heads=16, mlp_ratio=4.0, num_classes=1000, learn_sigma=True):
    super().__init__()
    self.patch, self.out_ch = patch_size, in_channels * (2 if learn_sigma else 1)
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    grid = input_size // patch_size
    # A fixed table, saved with the weights as in the published files.
    self.pos_embed = nn.Parameter(
        torch.from_numpy(sincos_table(hidden_size, grid)).float()[None], requires_grad=False)
    self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_ch)

  def forward(self, x, t, y):
    h = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    for block in self.blocks:
      h = block(h, c)
    h = self.final_layer(h, c)
    b, n, _ = h.shape
    g, p = int(n ** 0.5), self.patch
    h = h.reshape(b, g, g, p, p, self.out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, self.out_ch, g * p, g * p)
