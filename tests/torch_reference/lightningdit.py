"""LightningDiT (hustvl/LightningDiT models/lightningdit.py) restated in PyTorch for tests, with
the module names of its checkpoints, so `state_dict()` has exactly their keys (buffers
included). Written from the official architecture, not copied: RMSNorm with a weight (float32
inside, cast back before the weight), SwiGLU (w12 split in halves, silu(a) * b, w3), EVA-02's
2-D rotary tables on q and k (first half of the head by the row, second by the column,
pairs (2k, 2k+1) rotated), optional qk RMSNorm, adaLN-Zero with shift, patch embedding plus
the 2-D sin-cos table, no learn_sigma. Time and output in the official (SiT) convention.
"""
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from tests.torch_reference.dit import LabelEmbedder, PatchEmbed, TimestepEmbedder, modulate
from tests.torch_reference.dit import sincos_table


class RMSNorm(nn.Module):
  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    return h.type_as(x) * self.weight


class Rope(nn.Module):
  """Fixed (N, head_dim) cos/sin tables, saved with the weights as the official buffers are."""

  def __init__(self, head_dim, grid, theta=10000.0):
    super().__init__()
    dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
    pos = torch.arange(grid).float()
    ang = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (G, dim)
    table = torch.cat([ang[:, None, :].expand(grid, grid, dim),
                       ang[None, :, :].expand(grid, grid, dim)], -1).reshape(grid * grid, -1)
    self.register_buffer("freqs_cos", table.cos())
    self.register_buffer("freqs_sin", table.sin())

  def forward(self, x):  # x (B, H, N, hd)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * self.freqs_cos + rotated * self.freqs_sin


class Attention(nn.Module):
  def __init__(self, dim, heads, qk_norm):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
    self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, rope):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = rope(q), rope(k)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.w12 = nn.Linear(dim, 2 * hidden)
    self.w3 = nn.Linear(hidden, dim)

  def forward(self, x):
    a, b = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(a) * b)


class Block(nn.Module):
  def __init__(self, dim, heads, mlp_ratio, qk_norm):
    super().__init__()
    self.norm1 = RMSNorm(dim)
    self.attn = Attention(dim, heads, qk_norm)
    self.norm2 = RMSNorm(dim)
    self.mlp = SwiGLU(dim, int(2 / 3 * int(dim * mlp_ratio)))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, c, rope):
    s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, c1), rope)
    return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, c2))


class FinalLayer(nn.Module):
  def __init__(self, dim, patch, out_ch):
    super().__init__()
    self.norm_final = RMSNorm(dim)
    self.linear = nn.Linear(dim, patch * patch * out_ch)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
  """forward(x NCHW, t (B,) in the official convention, y (B,)) -> (B, C, H, W)."""

  def __init__(self, input_size=16, patch_size=1, in_channels=32, hidden_size=1152, depth=28,
               num_heads=16, mlp_ratio=4.0, num_classes=1000, qk_norm=False, use_rope=True):
    super().__init__()
    self.patch, self.out_ch = patch_size, in_channels
    grid = input_size // patch_size
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    self.pos_embed = nn.Parameter(
        torch.from_numpy(np.asarray(sincos_table(hidden_size, grid))).float()[None],
        requires_grad=False)
    self.feat_rope = Rope(hidden_size // num_heads, grid) if use_rope else None
    self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, qk_norm)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)

  def forward(self, x, t, y):
    h = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    for block in self.blocks:
      h = block(h, c, self.feat_rope)
    h = self.final_layer(h, c)
    b, n, _ = h.shape
    g, p = int(n ** 0.5), self.patch
    h = h.reshape(b, g, g, p, p, self.out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, self.out_ch, g * p, g * p)
