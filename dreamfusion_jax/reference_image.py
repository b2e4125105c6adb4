"""The input image of image-to-3D: read, masked, and made into the run's conditioning.

An RGBA file's alpha is the object's mask. An RGB file must show the object on a
plain background: the background colour is the median of the one-pixel border, and a
pixel belongs to the object where its colour differs from it by more than
`BACKGROUND_TOLERANCE` (max over channels).

By default the image is used as it is: square, the object centred and framed as the
reference camera (config.reference) would see it, as the toy inputs are. With
`config.reference.object_size = f` > 0 it is first recentred, as stable-dreamfusion's
preprocess_image.py does with Zero-1-to-3 inputs (border ratio 0.2, i.e. f = 0.8): the
mask's bounding box is cut out, scaled so that its longer side is f of the frame, and
centred on a square canvas, so any photo, square or not, off-centre or not, works.

The run's conditioning (`image_conditioning`) carries the guidance's encoding of the
input composited over white (Zero-1-to-3's inputs have white backgrounds) and the
image and mask at the render size for the reference-view loss
(losses.reference_view_loss).
"""

from __future__ import annotations

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dreamfusion_jax import errors

Array = jax.Array

BACKGROUND_TOLERANCE = 0.1  # colour distance (0-1 units) from the border colour that counts as object


@flax.struct.dataclass
class ReferenceConditioning:
  """Everything an image-to-3D step needs of its input image (a pytree).

  Attributes:
    guidance: the guidance's encoding of the input (zero123.ImageConditioning).
    rgb: (H, W, 3) the input at the render size, in [0, 1] (its background: anything).
    mask: (H, W) the object's mask at the render size, in [0, 1].
  """

  guidance: object
  rgb: Array
  mask: Array

  def for_views(self, cameras, buckets: Array, perp_neg: bool = False):
    """The views' conditioning object: the prior's (its `ImageConditioning.for_views`)."""
    return self.guidance.for_views(cameras, buckets, perp_neg)


def read_image(path: str | os.PathLike, object_size: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """The image at `path` as (rgb (S, S, 3), mask (S, S)), float32 in [0, 1]: as it is
  (S = its side), or recentred by `recenter` when `object_size` > 0 (S = its longer side).

  Raises:
    InputError: unreadable, not square (without recentring), or no object found (empty mask).
  """
  if not os.path.isfile(path):
    raise errors.InputError(f"--config.image={str(path)!r}: no such file")
  try:
    with Image.open(path) as im:
      mode = im.mode
      pixels = np.asarray(im.convert("RGBA" if "A" in mode or mode == "P" else "RGB"), np.float32) / 255.0
  except (OSError, ValueError) as e:
    raise errors.InputError(f"--config.image={str(path)!r} is not a readable image ({errors.first_line(e)})") from None
  h, w = pixels.shape[:2]
  if h != w and not object_size:
    raise errors.InputError(f"--config.image={str(path)!r} is {w}x{h}: the input must be square, the object "
                            "centred (crop it first, or recentre it: --config.reference.object_size=0.8)")
  rgb = pixels[..., :3]
  mask = pixels[..., 3] if pixels.shape[-1] == 4 else plain_background_mask(rgb)
  if mask.max() < 0.5:
    raise errors.InputError(f"--config.image={str(path)!r}: no object found (the mask is empty; an RGB image needs "
                            "a plain background, an RGBA image a non-zero alpha)")
  if object_size:
    rgb, mask = recenter(rgb, mask, object_size)
  return rgb, mask


def recenter(rgb: np.ndarray, mask: np.ndarray, object_size: float) -> tuple[np.ndarray, np.ndarray]:
  """The object alone, scaled and centred on a square canvas.

  Args:
    rgb: (H, W, 3); mask: (H, W), the object where mask > 0.5.
    object_size: in (0, 1], the fraction of the canvas the object's longer side fills.

  Returns:
    rgb (S, S, 3) (0 outside the object's box) and mask (S, S), S = max(H, W); the box
    of mask > 0.5 (its pixels' outer edges) is centred, its aspect ratio kept.
  """
  if not 0.0 < object_size <= 1.0:
    raise errors.InputError(f"config.reference.object_size must lie in (0, 1], got {object_size}")
  rows, cols = np.nonzero(mask > 0.5)
  r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
  side = max(mask.shape)
  scale = object_size * side / max(r1 - r0, c1 - c0)
  h2, w2 = max(1, round((r1 - r0) * scale)), max(1, round((c1 - c0) * scale))
  top, left = (side - h2) // 2, (side - w2) // 2
  box = np.concatenate([rgb[r0:r1, c0:c1], mask[r0:r1, c0:c1, None]], axis=-1)
  out = np.zeros((side, side, 4), np.float32)
  out[top:top + h2, left:left + w2] = np.clip(resize_to(box, (h2, w2)), 0.0, 1.0)
  return out[..., :3], out[..., 3]


def plain_background_mask(rgb: np.ndarray, tolerance: float = BACKGROUND_TOLERANCE) -> np.ndarray:
  """(H, W) {0, 1} float32: pixels whose colour differs from the median colour of the
  image's one-pixel border by more than `tolerance` in some channel."""
  border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
  background = np.median(border, axis=0)
  return (np.max(np.abs(rgb - background), axis=-1) > tolerance).astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W[, C]) -> (size, size[, C]), antialiased bilinear."""
  return resize_to(image, (size, size))


def resize_to(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """(H, W[, C]) -> (h, w[, C]), antialiased bilinear."""
  shape = tuple(hw) + image.shape[2:]
  return np.asarray(jax.image.resize(jnp.asarray(image, jnp.float32), shape, method="bilinear", antialias=True))


def over_white(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The object composited over a white background."""
  return rgb * mask[..., None] + (1.0 - mask[..., None])


def image_conditioning(guidance, params, path: str | os.PathLike, *, camera: tuple[float, float, float],
                       render_size: tuple[int, int], object_size: float = 0.0) -> ReferenceConditioning:
  """Reads the input image and encodes it for the run.

  Args:
    guidance, params: a loaded Zero-1-to-3 (guidance/priors/zero123.py).
    camera: (elevation_deg, azimuth_deg, radius) of the view the image was taken from.
    render_size: (H, W) of the training renders (square).
    object_size: 0 (the image as it is) or the recentred object's size (read_image).
  """
  rgb, mask = read_image(path, object_size)
  h, w = render_size
  if h != w:
    raise errors.InputError(f"image-to-3D renders square views: config.render.height={h}, width={w}")
  encoded = guidance.encode_image(params, jnp.asarray(over_white(rgb, mask)), camera)
  return ReferenceConditioning(guidance=encoded, rgb=jnp.asarray(resize(rgb, h)),
                               mask=jnp.asarray(np.clip(resize(mask, h), 0.0, 1.0)))
