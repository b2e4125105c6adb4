"""Image grids and PNG files: the boundary between float renders and files on disk."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dreamfusion_jax import files


def to_uint8(image) -> np.ndarray:
  """float image in [0, 1] (H, W, C) or (H, W) -> uint8 RGB (H, W, 3)."""
  image = np.asarray(image, np.float32)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return (np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def premultiplied_to_rgba(rgb_over_black, opacity) -> np.ndarray:
  """A render over black (colour x opacity) and its opacity (H, W) -> uint8 RGBA
  (H, W, 4) with the colour un-premultiplied, as PNG stores it."""
  rgb_over_black, opacity = np.asarray(rgb_over_black, np.float32), np.asarray(opacity, np.float32)
  colour = rgb_over_black / np.maximum(opacity[..., None], 1e-6)
  return np.concatenate([to_uint8(colour), to_uint8(opacity)[..., :1]], axis=-1)


def image_grid(rows) -> np.ndarray:
  """Tiles rows of images into one picture.

  Args:
    rows: list of R arrays (N, H, W, C) or (N, H, W) with the same N, H, W; each is
      one row of the grid (e.g. rgb, normals, opacity of N views).

  Returns:
    uint8 (R * H, N * W, 3).
  """
  tiles = [np.concatenate(list(to_uint8_batch(r)), axis=1) for r in rows]
  return np.concatenate(tiles, axis=0)


def to_uint8_batch(images) -> np.ndarray:
  """(N, H, W[, C]) floats -> (N, H, W, 3) uint8."""
  return np.stack([to_uint8(x) for x in np.asarray(images)])


def depth_to_gray(depth, opacity) -> np.ndarray:
  """Depth maps (..., H, W) to [0, 1] for viewing: near is bright, empty rays black."""
  depth, opacity = np.asarray(depth), np.asarray(opacity)
  hit = opacity > 0.5
  if not hit.any():
    return np.zeros_like(depth)
  lo, hi = depth[hit].min(), depth[hit].max()
  return np.where(hit, 1.0 - (depth - lo) / max(hi - lo, 1e-6) * 0.8, 0.0)


def save_png(path: str, image) -> None:
  """Writes an image atomically: a crash mid-write never leaves a truncated file."""
  array = image if np.asarray(image).dtype == np.uint8 else to_uint8(image)
  files.write_atomically(path, lambda tmp: Image.fromarray(np.asarray(array)).save(tmp, format="PNG"))
