"""REPA's SiT (Yu et al. 2024, sihyun-yu/REPA models/sit.py) in PyTorch, restated for tests from
its published architecture: the DiT/SiT network of tests/torch_reference/dit.py without
learn_sigma (out_channels = in_channels), plus the alignment projectors, one MLP
(Linear D -> P, SiLU, Linear P -> P, SiLU, Linear P -> z) per target encoder, applied to the
tokens after block `encoder_depth` (1-based). forward returns (prediction, [projected tokens]),
as REPA's does; the sampler reads the prediction only. Its time is REPA's t (t = 1 noise, the
linear path alpha = 1 - t, sigma = t), embedded as is; the prediction is the velocity e - x.
"""
from torch import nn

from tests.torch_reference.dit import DiT


def projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
  return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                       nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                       nn.Linear(projector_dim, z_dim))


class REPASiT(DiT):
  """forward(x NCHW, t (B,) REPA's time, y (B,)) -> ((B, C, H, W), [(B, N, z_j)])."""

  def __init__(self, z_dims=(768,), projector_dim=2048, encoder_depth=8, **kw):
    super().__init__(learn_sigma=False, **kw)
    hidden = self.pos_embed.shape[-1]
    self.encoder_depth = encoder_depth
    self.projectors = nn.ModuleList([projector(hidden, projector_dim, z) for z in z_dims])

  def forward(self, x, t, y):
    h = self.x_embedder(x) + self.pos_embed
    b, n, d = h.shape
    c = self.t_embedder(t) + self.y_embedder(y)
    zs = []
    for i, block in enumerate(self.blocks):
      h = block(h, c)
      if i + 1 == self.encoder_depth:
        zs = [p(h.reshape(-1, d)).reshape(b, n, -1) for p in self.projectors]
    h = self.final_layer(h, c)
    g, p = int(n ** 0.5), self.patch
    h = h.reshape(b, g, g, p, p, self.out_ch)
    return h.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_ch, g * p, g * p), zs
