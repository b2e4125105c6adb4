"""The input image of image-to-3D: read, masked, and made into the run's conditioning.

An RGBA file's alpha is the object's mask. An RGB file must show the object on a
plain background: the background colour is the median of the one-pixel border, and a
pixel belongs to the object where its colour differs from it by more than
`BACKGROUND_TOLERANCE` (max over channels). The image is used as it is (square,
object centred, as Zero-1-to-3 expects its inputs): no recentring or cropping.

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


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """The image at `path` as (rgb (H, W, 3), mask (H, W)), float32 in [0, 1].

  Raises:
    InputError: unreadable, not square, or no object found (empty mask).
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
  if h != w:
    raise errors.InputError(f"--config.image={str(path)!r} is {w}x{h}: the input must be square, the object "
                            "centred (crop it first)")
  rgb = pixels[..., :3]
  mask = pixels[..., 3] if pixels.shape[-1] == 4 else plain_background_mask(rgb)
  if mask.max() < 0.5:
    raise errors.InputError(f"--config.image={str(path)!r}: no object found (the mask is empty; an RGB image needs "
                            "a plain background, an RGBA image a non-zero alpha)")
  return rgb, mask


def plain_background_mask(rgb: np.ndarray, tolerance: float = BACKGROUND_TOLERANCE) -> np.ndarray:
  """(H, W) {0, 1} float32: pixels whose colour differs from the median colour of the
  image's one-pixel border by more than `tolerance` in some channel."""
  border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
  background = np.median(border, axis=0)
  return (np.max(np.abs(rgb - background), axis=-1) > tolerance).astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W[, C]) -> (size, size[, C]), antialiased bilinear."""
  shape = (size, size) + image.shape[2:]
  return np.asarray(jax.image.resize(jnp.asarray(image, jnp.float32), shape, method="bilinear", antialias=True))


def over_white(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The object composited over a white background."""
  return rgb * mask[..., None] + (1.0 - mask[..., None])


def image_conditioning(guidance, params, path: str | os.PathLike, *, camera: tuple[float, float, float],
                       render_size: tuple[int, int]) -> ReferenceConditioning:
  """Reads the input image and encodes it for the run.

  Args:
    guidance, params: a loaded Zero-1-to-3 (guidance/zero123.py).
    camera: (elevation_deg, azimuth_deg, radius) of the view the image was taken from.
    render_size: (H, W) of the training renders (square).
  """
  rgb, mask = read_image(path)
  h, w = render_size
  if h != w:
    raise errors.InputError(f"image-to-3D renders square views: config.render.height={h}, width={w}")
  encoded = guidance.encode_image(params, jnp.asarray(over_white(rgb, mask)), camera)
  return ReferenceConditioning(guidance=encoded, rgb=jnp.asarray(resize(rgb, h)),
                               mask=jnp.asarray(np.clip(resize(mask, h), 0.0, 1.0)))
