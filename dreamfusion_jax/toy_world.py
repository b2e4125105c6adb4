"""The toy world of the embedded prior: primitive shapes in a few colours.

Each object is an analytic signed distance function turned into a volume density, so
the project's own renderer draws the prior's training images, and the same fields are
the ground truth an optimised NeRF is scored against (toy_score.py). All objects
sit at the origin at one scale, as the NeRF's density blob does.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamfusion_jax import cameras as cameras_lib
from dreamfusion_jax import render

Array = jax.Array

SHAPES = ("cube", "sphere", "cone", "torus")
COLORS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.85),
    "yellow": (0.90, 0.82, 0.12),
}
COLOR_NAMES = tuple(COLORS)

# Sizes in world units (the NeRF's bounding sphere has radius 1).
CUBE_HALF_EXTENT = 0.33
SPHERE_RADIUS = 0.42
CONE_HALF_HEIGHT, CONE_RADIUS = 0.4, 0.4
TORUS_MAJOR, TORUS_MINOR = 0.3, 0.13


def prompt(shape: str, color: str) -> str:
  return f"a {color} {shape}"


def all_prompts() -> list[tuple[str, str, str]]:
  """(prompt, shape, colour) for every object of the world, shape-major."""
  return [(prompt(s, c), s, c) for s in SHAPES for c in COLOR_NAMES]


def parse_prompt(text: str) -> tuple[str, str]:
  """(shape, colour) named by a prompt such as "a red cube, side view"."""
  words = text.replace(",", " ").split()
  shapes = [w for w in words if w in SHAPES]
  colors = [w for w in words if w in COLORS]
  if len(shapes) != 1 or len(colors) != 1:
    raise ValueError(f"prompt {text!r} must name one shape of {SHAPES} and one colour of {COLOR_NAMES}")
  return shapes[0], colors[0]


def sdf_box(x: Array, half_extent: float) -> Array:
  q = jnp.abs(x) - half_extent
  # sqrt(. + eps), not norm: the norm's gradient at 0 (every interior point) is NaN.
  outside = jnp.sqrt(jnp.sum(jnp.maximum(q, 0.0) ** 2, axis=-1) + 1e-12)
  inside = jnp.minimum(jnp.max(q, axis=-1), 0.0)
  return outside + inside


def sdf_sphere(x: Array, radius: float) -> Array:
  return jnp.sqrt(jnp.sum(x * x, axis=-1) + 1e-12) - radius


def sdf_cone(x: Array, half_height: float, radius: float) -> Array:
  """Exact distance to a solid cone, axis +z, base of `radius` at z = -half_height,
  tip at z = +half_height (Quilez's capped cone with a zero top radius)."""
  qx = jnp.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2 + 1e-12)
  qy = x[..., 2]
  h, r1 = half_height, radius
  k1 = jnp.array([0.0, h])
  k2 = jnp.array([-r1, 2.0 * h])
  ca_x = qx - jnp.minimum(qx, jnp.where(qy < 0.0, r1, 0.0))
  ca_y = jnp.abs(qy) - h
  q = jnp.stack([qx, qy], axis=-1)
  s = jnp.clip(jnp.sum((k1 - q) * k2, axis=-1) / jnp.sum(k2 * k2), 0.0, 1.0)
  cb = q - k1 + k2 * s[..., None]
  sign = jnp.where((cb[..., 0] < 0.0) & (ca_y < 0.0), -1.0, 1.0)
  return sign * jnp.sqrt(jnp.minimum(ca_x**2 + ca_y**2, jnp.sum(cb * cb, axis=-1)) + 1e-12)


def sdf_torus(x: Array, major: float, minor: float) -> Array:
  """A ring lying in the xy plane (axis +z)."""
  ring = jnp.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2 + 1e-12) - major
  return jnp.sqrt(ring**2 + x[..., 2] ** 2 + 1e-12) - minor


def shape_sdf(shape_index: Array, x: Array) -> Array:
  """Signed distance (..., ) of points (..., 3) to the shape SHAPES[shape_index]
  (an int, possibly traced)."""
  branches = [
      lambda p: sdf_box(p, CUBE_HALF_EXTENT),
      lambda p: sdf_sphere(p, SPHERE_RADIUS),
      lambda p: sdf_cone(p, CONE_HALF_HEIGHT, CONE_RADIUS),
      lambda p: sdf_torus(p, TORUS_MAJOR, TORUS_MINOR),
  ]
  return jax.lax.switch(shape_index, branches, x)


def object_field(shape_index: Array, color: Array, *, max_density: float = 300.0, softness: float = 0.02):
  """The object as a render.py field: density max_density * sigmoid(-sdf / softness).

  The soft step spreads the surface over a few `softness`: thin against a pixel of
  the prior's renders, but wider than a ray sample step, so the samples that carry
  the weight see a non-zero density gradient and the normals are not noise.
  """

  def field_fn(x):
    density = max_density * jax.nn.sigmoid(-shape_sdf(shape_index, x) / softness)
    return density, jnp.broadcast_to(color, x.shape)

  return field_fn


@dataclasses.dataclass(frozen=True)
class ViewDistribution:
  """Camera, light, shading and background distribution of the toy world's images
  (shared by the prior's training data and the toy text-to-3D config)."""

  radius_range: tuple = (1.5, 1.9)
  # Up to straight above (the base config's range): at most 45 degrees the torus's hole
  # and the cube's square top were barely in view, and SDS made lenses and drums
  # (docs/toy_prior.md, prior v2).
  elevation_range_deg: tuple = (-10.0, 90.0)
  fovy_range_deg: tuple = (40.0, 50.0)
  light_distance_range: tuple = (1.5, 2.5)
  light_perturb: float = 0.7
  ambient: float = 0.3
  diffuse: float = 0.7
  shading_probs: tuple = (0.5, 0.5, 0.0)  # albedo, lambertian, textureless

  def camera_kwargs(self) -> dict:
    return dict(radius_range=self.radius_range, elevation_range_deg=self.elevation_range_deg,
                azimuth_range_deg=(-180.0, 180.0), fovy_range_deg=self.fovy_range_deg, camera_perturb=0.0,
                center_perturb=0.0, up_perturb=0.0)


def render_objects(
    key: Array,
    shape_index: Array,
    color_index: Array,
    *,
    size: int,
    views: ViewDistribution = ViewDistribution(),
    num_samples: int = 128,
) -> dict:
  """Renders one random view of each of B objects over random solid backgrounds.

  Args:
    key: PRNG key.
    shape_index, color_index: (B,) int32 indices into SHAPES and COLOR_NAMES.
    size: image side in pixels.

  Returns:
    dict of "image" (B, size, size, 3) in [0, 1], "opacity" (B, size, size),
    "bucket" (B,) view bucket, "azimuth_deg", "elevation_deg" and "radius" (B,).
  """
  b = shape_index.shape[0]
  k_cam, k_light, k_shade, k_bg, k_jitter = jax.random.split(key, 5)
  cams = cameras_lib.sample_cameras(k_cam, b, stratified_azimuth=False, **views.camera_kwargs())
  lights = cameras_lib.sample_lights(k_light, cams, distance_range=views.light_distance_range,
                                     position_perturb=views.light_perturb)
  shading = render.sample_shading(k_shade, b, views.shading_probs)
  background = jax.random.uniform(k_bg, (b, 3))
  origins, directions = cameras_lib.generate_rays(cams, size, size)
  palette = jnp.asarray(np.array([COLORS[c] for c in COLOR_NAMES], np.float32))

  def one(o, d, key, light, mode, bg, shape, color):
    field_fn = object_field(shape, palette[color])
    out = render.render_rays(field_fn, o.reshape(-1, 3), d.reshape(-1, 3), key=key, num_samples=num_samples,
                             light_positions=light, shading=mode, ambient=views.ambient, diffuse=views.diffuse,
                             background=bg)
    return out.rgb.reshape(size, size, 3), out.opacity.reshape(size, size)

  image, opacity = jax.vmap(one)(origins, directions, jax.random.split(k_jitter, b), lights, shading, background,
                                 shape_index, color_index)
  return {"image": image, "opacity": opacity,
          "bucket": cameras_lib.view_bucket(cams.azimuth_deg, cams.elevation_deg),
          "azimuth_deg": cams.azimuth_deg, "elevation_deg": cams.elevation_deg, "radius": cams.radius}


def render_view(prompt_text: str, *, elevation_deg: float, azimuth_deg: float, radius: float, fovy_deg: float,
                size: int, shading: str = "albedo", num_samples: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """One view of the object a prompt names ("a red cube"), as an image-to-3D input.

  Returns:
    rgb (size, size, 3) over black and opacity (size, size), float32 numpy in [0, 1]
    (RGBA: rgb / opacity where opacity > 0 is the object's colour).
  """
  shape, color = parse_prompt(prompt_text)
  if shading not in render.SHADING_MODES:
    raise ValueError(f"shading={shading!r}; known: {tuple(render.SHADING_MODES)}")
  cams = cameras_lib.orbit_cameras(1, elevation_deg=elevation_deg, radius=radius, fovy_deg=fovy_deg,
                                   start_azimuth_deg=azimuth_deg)
  origins, directions = cameras_lib.generate_rays(cams, size, size)
  field_fn = object_field(SHAPES.index(shape), jnp.asarray(COLORS[color], jnp.float32))
  views = ViewDistribution()
  # The light sits at the camera (a headlight) for lambertian shading.
  out = render.render_rays(field_fn, origins.reshape(-1, 3), directions.reshape(-1, 3), key=None,
                           deterministic=True, num_samples=num_samples, light_positions=cams.positions[0],
                           shading=render.SHADING_MODES.index(shading), ambient=views.ambient, diffuse=views.diffuse,
                           background=jnp.zeros((size * size, 3)))
  return (np.asarray(out.rgb).reshape(size, size, 3).astype(np.float32),
          np.asarray(out.opacity).reshape(size, size).astype(np.float32))


def closest_color(rgb: Sequence[float]) -> str:
  """The vocabulary colour nearest (Euclidean, RGB) to a mean object colour."""
  rgb = np.asarray(rgb, np.float32)
  return min(COLOR_NAMES, key=lambda c: float(np.sum((np.asarray(COLORS[c]) - rgb) ** 2)))
