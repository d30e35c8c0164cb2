"""Pictures of samples as PNG, with pillow only (matplotlib is not a dependency).

- image_grid / save_image_grid: images in [-1, 1], NHWC, tiled in rows, upscaled by pixel
  repetition (nearest) so that 8x8 digits are visible; PNG, never JPEG (lossy encodings move
  sample metrics).
- scatter_image / scatter_png: 2-D point sets rasterised with numpy, drawn in list order
  (put the real data first, in grey, and the samples over it in colour).
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Named colours for scatter plots (RGB).
COLORS = {
    "grey": (170, 170, 170), "gray": (170, 170, 170), "black": (0, 0, 0),
    "red": (214, 39, 40), "blue": (31, 119, 180), "green": (44, 160, 44),
    "orange": (255, 127, 14), "purple": (148, 103, 189),
}


def image_grid(images, nrow: int | None = None, upscale: int | None = None,
               padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
  """Tiles images into one uint8 picture.

  Args:
    images: (N, H, W, C) in [-1, 1], C = 1 (grey) or 3 (RGB); values outside are clipped.
    nrow: images per row (as torchvision's make_grid); default ceil(sqrt(N)).
    upscale: pixel repetition factor; default: the smallest making each tile >= 32 pixels.
    padding: pixels between tiles (before upscaling).
    pad_value: colour of the padding in [-1, 1] (1 = white).
  Returns:
    uint8 (rows * (H + padding) + padding) * upscale x (same for columns) x C.
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be (N, H, W, 1 or 3), got shape {x.shape}")
  n, h, w, c = x.shape
  nrow = nrow or max(1, math.ceil(math.sqrt(n)))
  num_rows = math.ceil(n / nrow)
  upscale = upscale or max(1, math.ceil(32 / max(h, w)))
  grid = np.full((num_rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                 pad_value, np.float32)
  for i in range(n):
    r, q = divmod(i, nrow)
    top, left = padding + r * (h + padding), padding + q * (w + padding)
    grid[top:top + h, left:left + w] = x[i]
  grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  return np.round((np.clip(grid, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _save_png(array: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  mode = "L" if array.shape[-1] == 1 else "RGB"
  Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode).save(path, format="PNG")


def save_image_grid(images, path: str, nrow: int | None = None, **kwargs) -> np.ndarray:
  """Writes image_grid(images, nrow, **kwargs) to path as PNG; returns the uint8 grid."""
  grid = image_grid(images, nrow, **kwargs)
  _save_png(grid, path)
  return grid


def _rgb(color) -> tuple[int, int, int]:
  if isinstance(color, str):
    if color not in COLORS:
      raise ValueError(f"unknown colour {color!r}; use an RGB tuple or one of {sorted(COLORS)}")
    return COLORS[color]
  return tuple(int(v) for v in color)


def scatter_image(points_list, colors, size: int = 512, extent=None,
                  radius: int = 1) -> np.ndarray:
  """Rasterises 2-D point sets on a white canvas: uint8 (size, size, 3).

  Args:
    points_list: sequence of (N_i, 2) arrays, drawn in order (later ones on top).
    colors: one colour per set: a name of COLORS or an RGB tuple of 0..255.
    size: canvas side in pixels.
    extent: (xmin, xmax, ymin, ymax); default: a square around all points with a 5% margin,
      so that sets drawn together share one scale. y points up, as in a plot.
    radius: each point is a square of (2 radius + 1)^2 pixels.
  """
  if len(points_list) != len(colors):
    raise ValueError(f"{len(points_list)} point sets but {len(colors)} colours")
  pts = [np.asarray(p, np.float64).reshape(-1, 2) for p in points_list]
  if extent is None:
    allp = np.concatenate(pts) if pts else np.zeros((1, 2))
    finite = allp[np.all(np.isfinite(allp), axis=1)]
    lo, hi = (finite.min(0), finite.max(0)) if len(finite) else (np.full(2, -1.), np.full(2, 1.))
    centre, half = (lo + hi) / 2, max(float(np.max(hi - lo)) / 2, 1e-6) * 1.05
    extent = (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)
  xmin, xmax, ymin, ymax = extent
  canvas = np.full((size, size, 3), 255, np.uint8)
  offsets = np.arange(-radius, radius + 1)
  for p, color in zip(pts, colors):
    p = p[np.all(np.isfinite(p), axis=1)]
    col = np.round((p[:, 0] - xmin) / (xmax - xmin) * (size - 1)).astype(np.int64)
    row = np.round((ymax - p[:, 1]) / (ymax - ymin) * (size - 1)).astype(np.int64)
    # Every point becomes a small square: all (dy, dx) offsets at once, clipped to the canvas.
    rr = (row[:, None, None] + offsets[None, :, None]).repeat(len(offsets), axis=2).ravel()
    cc = (col[:, None, None] + offsets[None, None, :]).repeat(len(offsets), axis=1).ravel()
    keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
    canvas[rr[keep], cc[keep]] = _rgb(color)
  return canvas


def scatter_png(points_list, colors, path: str, **kwargs) -> np.ndarray:
  """Writes scatter_image(points_list, colors, **kwargs) to path as PNG; returns the image."""
  image = scatter_image(points_list, colors, **kwargs)
  _save_png(image, path)
  return image


def save_captioned_grid(images, captions, path: str, max_columns: int = 12) -> np.ndarray:
  """Images in [-1, 1] (NHWC), one caption each: consecutive images with the same caption form
  a row (wrapped after max_columns), the caption printed under it.

  Pillow's built-in bitmap font, so no font file is needed. Returns the RGB uint8 array written.
  """
  images = np.asarray(images)
  if len(captions) != len(images):
    raise ValueError(f"{len(images)} images need {len(images)} captions; got {len(captions)}.")
  rows = []  # (first index, end index, caption)
  for i, text in enumerate(captions):
    if rows and rows[-1][2] == text and rows[-1][1] - rows[-1][0] < max_columns:
      rows[-1] = (rows[-1][0], i + 1, text)
    else:
      rows.append((i, i + 1, text))
  upscale = max(1, math.ceil(32 / max(images.shape[1:3])))
  tiles = [image_grid(images[a:b], nrow=b - a, upscale=upscale) for a, b, _ in rows]
  return save_tile_rows(tiles, [text for *_, text in rows], path)


def save_tile_rows(tiles, captions, path: str) -> np.ndarray:
  """uint8 tiles (image_grid's, grey or RGB) stacked top to bottom, captions[i] printed under
  tiles[i] with Pillow's built-in bitmap font (no font file needed), written as PNG. Returns the
  RGB uint8 array written."""
  font = ImageFont.load_default()
  line = 14  # pixels of caption under each row
  width = max([t.shape[1] for t in tiles] + [int(font.getlength(text)) + 8 for text in captions])
  canvas = Image.new("RGB", (width, sum(t.shape[0] + line for t in tiles)), "white")
  draw = ImageDraw.Draw(canvas)
  y = 0
  for tile, text in zip(tiles, captions):
    rgb = tile if tile.shape[-1] == 3 else np.repeat(tile[..., :1], 3, axis=-1)
    canvas.paste(Image.fromarray(rgb), (0, y))
    y += tile.shape[0]
    draw.text((4, y + 1), text, fill="black", font=font)
    y += line
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path, format="PNG")  # never JPEG (PITFALLS.md)
  return np.asarray(canvas)
