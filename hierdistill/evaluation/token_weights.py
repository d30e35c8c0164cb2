"""Where the AWD looks: its token weights over the samples, as a picture and as numbers.

The Adaptive Weighted Discriminator pools per-token logits with weights a_i (models/awd.py), a
softmax over the T tokens of a DiT. Uniform weights (the mean-pooled head) are a_i = 1 / T, so
the picture shows T a_i on a fixed logarithmic colour scale: grey where a token gets its uniform
share, red where it gets more (up to `scale` times), blue where it gets less (down to 1 / scale).
A head that learned nothing looks like the plain samples.

Token i covers the patch at grid row i // (W / p), column i % (W / p): the order of DiT's
patchify (a stride-p convolution reshaped row-major to (B, (H / p) (W / p), D), models/dit.py).

Numbers per sample (token_weight_stats): the effective number of tokens exp(entropy), and how
much weight lands on patches with ink (pixels away from the background) against the share of
such patches, so one can say "the AWD puts X% of its weight on strokes covering Y% of tokens".
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hierdistill.evaluation.grids import image_grid

# Colours of the ends of the scale (RGB, 0..1): more than the uniform share, and less.
_MORE = np.array([0.84, 0.15, 0.16])
_LESS = np.array([0.12, 0.47, 0.71])
_LEGEND_HEIGHT = 30  # pixels under the tiles: a colour bar and one line of text


def token_map(weights, image_hw: tuple[int, int], patch_size: int) -> np.ndarray:
  """Token weights (N, T) -> per-pixel maps (N, H, W): each token's weight fills its patch."""
  w = np.asarray(weights, np.float64)
  h, wd = (int(v) for v in image_hw)
  p = int(patch_size)
  if p < 1 or h % p or wd % p:
    raise ValueError(f"images of {h}x{wd} pixels do not split into patches of {p}; give the "
                     "DiT's patch_size (config.model.patch_size).")
  gh, gw = h // p, wd // p
  if w.ndim != 2 or w.shape[1] != gh * gw:
    raise ValueError(f"token weights must be (N, {gh * gw}) for {h}x{wd} images in patches of "
                     f"{p}; got shape {w.shape}.")
  grid = w.reshape(w.shape[0], gh, gw)  # row-major, as DiT's patchify
  return np.repeat(np.repeat(grid, p, axis=1), p, axis=2)


def _grey(images) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> (N, H, W, 1): the mean over channels (RGB, or latents)."""
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C); got shape {x.shape}.")
  return x.mean(axis=-1, keepdims=True)


def overlay_image(images, weights, patch_size: int, *, scale: float = 4.0,
                  nrow: int | None = None, upscale: int | None = None,
                  legend: bool = True) -> np.ndarray:
  """The samples in grey, each token's patch tinted by T a_i: uint8 RGB (rows, columns, 3).

  Args:
    images: (N, H, W, C) in the data range [-1, 1] (C = 1 or 3; other C, e.g. latents, are shown
      as their channel mean).
    weights: (N, T) token weights (rows summing to 1), T = (H / p) (W / p) in DiT's patch order.
    patch_size: p.
    scale: T a_i = scale is full red, 1 / scale full blue, 1 (uniform) no tint.
    nrow, upscale: the tiling of grids.image_grid (default upscale: tiles of at least 48 pixels).
    legend: add a colour bar and a line of text under the tiles saying what the colours mean.
  """
  grey = _grey(images)
  n, h, w, _ = grey.shape
  if np.asarray(weights).shape[0] != n:
    raise ValueError(f"{n} images but {np.asarray(weights).shape[0]} rows of token weights.")
  if scale <= 1:
    raise ValueError(f"scale={scale} must be > 1 (the ratio to the uniform weight shown at full "
                     "colour).")
  t = np.asarray(weights).shape[1]
  # log_scale(T a_i) in [-1, 1]: 0 is the uniform share, the padding between tiles too.
  ratio = token_map(weights, (h, w), patch_size) * t
  level = np.clip(np.log(np.maximum(ratio, 1e-12)) / np.log(scale), -1.0, 1.0)
  upscale = upscale or max(1, -(-48 // max(h, w)))
  kw = dict(nrow=nrow, upscale=upscale)
  base = image_grid(grey, **kw).astype(np.float64) / 255.0  # (rows, cols, 1)
  tint = image_grid(level[..., None], pad_value=0.0, **kw).astype(np.float64) / 127.5 - 1.0
  alpha = np.abs(tint)
  alpha[alpha < 1.5 / 127.5] = 0.0  # the uint8 tiling rounds 0 to 1/255: uniform is untinted
  colour = np.where(tint > 0, _MORE, _LESS)  # (rows, cols, 3)
  # The grey is kept dim under the colour so that both ink and tint stay readable.
  rgb = (1 - 0.7 * alpha) * base + 0.7 * alpha * colour
  picture = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
  if legend:
    picture = _with_legend(picture, t, scale)
  return picture


def _with_legend(picture: np.ndarray, num_tokens: int, scale: float) -> np.ndarray:
  """A colour bar from 1 / scale to scale times the uniform weight, and what it means."""
  text = (f"colour: weight x T (T={num_tokens}); grey = uniform 1/T, blue 1/{scale:g}x, "
          f"red {scale:g}x")
  font = ImageFont.load_default()
  width = max(picture.shape[1], int(font.getlength(text)) + 8)
  canvas = Image.new("RGB", (width, picture.shape[0] + _LEGEND_HEIGHT), "white")
  canvas.paste(Image.fromarray(picture), (0, 0))
  bar_w = min(width - 8, 120)
  level = np.linspace(-1.0, 1.0, bar_w)[:, None]
  bar = (1 - 0.7 * np.abs(level)) * 0.5 + 0.7 * np.abs(level) * np.where(level > 0, _MORE, _LESS)
  bar = np.round(np.repeat(bar[None], 8, axis=0) * 255).astype(np.uint8)
  canvas.paste(Image.fromarray(bar), (4, picture.shape[0] + 3))
  ImageDraw.Draw(canvas).text((4, picture.shape[0] + 13), text, fill="black", font=font)
  return np.asarray(canvas)


def save_overlay(images, weights, patch_size: int, path: str, **kwargs) -> np.ndarray:
  """Writes overlay_image(images, weights, patch_size, **kwargs) to path as PNG; returns it."""
  picture = overlay_image(images, weights, patch_size, **kwargs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(picture, mode="RGB").save(path, format="PNG")
  return picture


def token_weight_stats(images, weights, patch_size: int, *, background: float = -1.0,
                       ink_threshold: float = 0.5) -> dict[str, np.ndarray]:
  """Per-sample numbers of where the weights land: dict of (N,) float64 arrays.

  A token has ink when the mean over its patch (pixels and channels) of |x - background| exceeds
  ink_threshold (data units; the digits' and Fashion-MNIST's background is black, -1).
    effective_tokens  exp(-sum_i a_i log a_i): T for uniform weights, 1 for one token
    max_weight_x_T    T max_i a_i: 1 for uniform weights
    ink_tokens        the fraction of tokens with ink
    ink_weight        the weight on tokens with ink (equal to ink_tokens for uniform weights)
  """
  x = np.asarray(images, np.float64)
  a = np.asarray(weights, np.float64)
  n, h, w, _ = x.shape
  p = int(patch_size)
  token_map(a, (h, w), p)  # checks the shapes
  gh, gw = h // p, w // p
  dev = np.abs(x - background).mean(axis=-1).reshape(n, gh, p, gw, p).mean(axis=(2, 4))
  ink = (dev > ink_threshold).reshape(n, gh * gw)
  entropy = -np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0), axis=-1)
  return {"effective_tokens": np.exp(entropy),
          "max_weight_x_T": a.max(axis=-1) * a.shape[1],
          "ink_tokens": ink.mean(axis=-1),
          "ink_weight": np.sum(a * ink, axis=-1)}


def summarise(stats: dict[str, np.ndarray]) -> dict[str, float]:
  """Means over samples of token_weight_stats, for scalar logs."""
  return {k: float(np.mean(v)) for k, v in stats.items()}
