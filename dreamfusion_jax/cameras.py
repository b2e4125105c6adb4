"""Cameras: pose sampling, look-at, per-pixel rays, lights and view buckets.

Conventions (see docs/architecture.md): right-handed world, +z up, the object at the
origin. A camera at azimuth 0 sits on the +x axis and looks at the object's front.
Camera frames follow OpenGL: the camera looks along its local -z, +y is image up,
+x is image right. Angles are degrees at the API boundary (names end in `_deg`) and
radians inside.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

# Order matters: guidance keeps one text embedding per bucket in this order.
VIEW_BUCKETS = ("front", "side", "back", "overhead")
FRONT, SIDE, BACK, OVERHEAD = range(4)


@flax.struct.dataclass
class Cameras:
  """A batch of pinhole cameras.

  Attributes:
    positions: (B, 3) camera centres in world space.
    c2w: (B, 3, 3) camera-to-world rotations; columns are the camera's right, up and
      backward (-viewing direction) axes in world coordinates.
    fovy_deg: (B,) vertical field of view in degrees.
    azimuth_deg: (B,) azimuth of the unperturbed pose, in [-180, 180).
    elevation_deg: (B,) elevation of the unperturbed pose.
    radius: (B,) distance of the unperturbed pose from the look-at centre.
  """

  positions: Array
  c2w: Array
  fovy_deg: Array
  azimuth_deg: Array
  elevation_deg: Array
  radius: Array


def pose_matrices(cameras: Cameras) -> Array:
  """(B, 3, 4) camera-to-world matrices [R | t]: the rotation `c2w` and the centre."""
  return jnp.concatenate([cameras.c2w, cameras.positions[..., None]], axis=-1)


def spherical_to_cartesian(radius: Array, elevation_deg: Array, azimuth_deg: Array) -> Array:
  """Points on a sphere around the origin, +z up.

  Args:
    radius, elevation_deg, azimuth_deg: broadcastable arrays of shape (...).

  Returns:
    (..., 3) positions; azimuth 0 is +x, azimuth 90 is +y.
  """
  el = jnp.deg2rad(elevation_deg)
  az = jnp.deg2rad(azimuth_deg)
  return jnp.stack(
      [radius * jnp.cos(el) * jnp.cos(az), radius * jnp.cos(el) * jnp.sin(az), radius * jnp.sin(el)],
      axis=-1,
  )


def _normalize(v: Array, eps: float = 1e-12) -> Array:
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)


def elevation_tangent(elevation_deg: Array, azimuth_deg: Array) -> Array:
  """Unit vector along increasing elevation at a point of the sphere, +z up.

  It is the d/d(elevation) of the unit position (cos el cos az, cos el sin az, sin el):
  (-sin el cos az, -sin el sin az, cos el). For a camera on the sphere looking at the
  origin it is the image-up vector that +z gives, and it stays defined at +-90 degrees,
  where +z is parallel to the viewing direction.

  Args:
    elevation_deg, azimuth_deg: broadcastable arrays of shape (...).

  Returns:
    (..., 3) unit vectors.
  """
  el = jnp.deg2rad(elevation_deg)
  az = jnp.deg2rad(azimuth_deg)
  return jnp.stack([-jnp.sin(el) * jnp.cos(az), -jnp.sin(el) * jnp.sin(az), jnp.cos(el) * jnp.ones_like(az)],
                   axis=-1)


# Below this |forward x up| (unit forward, up of about unit length) the up vector is
# taken as parallel to the viewing direction; float32 directions at 89.99 degrees of
# elevation still give ~2e-4, far above it.
_PARALLEL_EPS = 1e-6


def look_at(eye: Array, target: Array, up: Array, *, fallback_up: Array | None = None) -> Array:
  """Camera-to-world rotation of a camera at `eye` looking at `target`.

  Args:
    eye, target, up: (..., 3). `up` need not be orthogonal to the viewing direction.
    fallback_up: (..., 3) used where `up` is (nearly) parallel to the viewing
      direction, e.g. a camera straight above the object with +z up; it must not be
      parallel itself. Default: the world axis least aligned with the viewing direction.
      `elevation_tangent` of the camera's angles gives the limit of the +z frame.

  Returns:
    (..., 3, 3) rotation with columns (right, up, backward), OpenGL style.
  """
  forward = _normalize(target - eye)
  right = jnp.cross(forward, up)
  if fallback_up is None:
    fallback_up = jnp.eye(3, dtype=forward.dtype)[jnp.argmin(jnp.abs(forward), axis=-1)]
  parallel = jnp.linalg.norm(right, axis=-1, keepdims=True) < _PARALLEL_EPS
  right = _normalize(jnp.where(parallel, jnp.cross(forward, fallback_up), right))
  true_up = jnp.cross(right, forward)
  return jnp.stack([right, true_up, -forward], axis=-1)


def wrap_degrees(angle_deg: Array) -> Array:
  """Wraps angles to [-180, 180)."""
  return (angle_deg + 180.0) % 360.0 - 180.0


def sample_cameras(
    key: Array,
    batch_size: int,
    *,
    radius_range: Sequence[float] = (1.0, 1.5),
    elevation_range_deg: Sequence[float] = (-10.0, 90.0),
    azimuth_range_deg: Sequence[float] = (-180.0, 180.0),
    fovy_range_deg: Sequence[float] = (40.0, 70.0),
    camera_perturb: float = 0.1,
    center_perturb: float = 0.2,
    up_perturb: float = 0.02,
    stratified_azimuth: bool = True,
) -> Cameras:
  """Random training poses as in DreamFusion (and threestudio's random-camera sampler).

  Radius, elevation and field of view are uniform in their ranges. Azimuth is uniform,
  or batch-stratified: camera i draws from the i-th of `batch_size` equal slices of the
  range, so a batch always covers all sides of the object. The camera centre, the
  look-at centre and the up vector are then jittered by Gaussian noise of the given
  standard deviations (world units; the up vector's before normalisation).

  Returns:
    Cameras with batch dimension `batch_size`.
  """
  keys = jax.random.split(key, 7)
  b = batch_size

  def uniform(k, lo_hi):
    return jax.random.uniform(k, (b,), minval=lo_hi[0], maxval=lo_hi[1])

  radius = uniform(keys[0], radius_range)
  elevation = uniform(keys[1], elevation_range_deg)
  az_lo, az_hi = azimuth_range_deg
  if stratified_azimuth:
    u = (jnp.arange(b) + jax.random.uniform(keys[2], (b,))) / b
  else:
    u = jax.random.uniform(keys[2], (b,))
  azimuth = wrap_degrees(az_lo + u * (az_hi - az_lo))
  fovy = uniform(keys[3], fovy_range_deg)

  positions = spherical_to_cartesian(radius, elevation, azimuth)
  positions = positions + camera_perturb * jax.random.normal(keys[4], (b, 3))
  center = center_perturb * jax.random.normal(keys[5], (b, 3))
  up = jnp.array([0.0, 0.0, 1.0]) + up_perturb * jax.random.normal(keys[6], (b, 3))
  return Cameras(
      positions=positions,
      c2w=look_at(positions, center, up, fallback_up=elevation_tangent(elevation, azimuth)),
      fovy_deg=fovy,
      azimuth_deg=azimuth,
      elevation_deg=elevation,
      radius=radius,
  )


def orbit_cameras(
    num_views: int,
    *,
    elevation_deg: float = 15.0,
    radius: float = 1.5,
    fovy_deg: float = 50.0,
    start_azimuth_deg: float = 0.0,
) -> Cameras:
  """Fixed evaluation poses: `num_views` cameras evenly spaced in azimuth on a circle.

  View i has azimuth `start_azimuth_deg + 360 * i / num_views` and looks at the origin.
  """
  azimuth = wrap_degrees(start_azimuth_deg + 360.0 * jnp.arange(num_views) / num_views)
  elevation = jnp.full((num_views,), elevation_deg, jnp.float32)
  radii = jnp.full((num_views,), radius, jnp.float32)
  positions = spherical_to_cartesian(radii, elevation, azimuth)
  up = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), positions.shape)
  return Cameras(
      positions=positions,
      c2w=look_at(positions, jnp.zeros_like(positions), up, fallback_up=elevation_tangent(elevation, azimuth)),
      fovy_deg=jnp.full((num_views,), fovy_deg, jnp.float32),
      azimuth_deg=azimuth,
      elevation_deg=elevation,
      radius=radii,
  )


def focal_length_pixels(fovy_deg: Array, height: int) -> Array:
  """Pinhole focal length in pixels for a vertical field of view."""
  return 0.5 * height / jnp.tan(0.5 * jnp.deg2rad(fovy_deg))


def pixel_rays(cameras: Cameras, pixels_xy: Array, height: int, width: int) -> tuple[Array, Array]:
  """Rays through arbitrary (sub)pixel positions.

  Args:
    cameras: batch of B cameras.
    pixels_xy: (B, ..., 2) image coordinates in pixels; (0, 0) is the top-left corner
      of the top-left pixel, so pixel (i, j) has its centre at (j + 0.5, i + 0.5).
    height, width: image size in pixels.

  Returns:
    origins (B, ..., 3) and unit directions (B, ..., 3) in world space.
  """
  extra = pixels_xy.ndim - 2
  focal = focal_length_pixels(cameras.fovy_deg, height).reshape((-1,) + (1,) * extra)
  x = (pixels_xy[..., 0] - 0.5 * width) / focal
  y = -(pixels_xy[..., 1] - 0.5 * height) / focal  # image rows grow downwards
  dirs_cam = jnp.stack([x, y, -jnp.ones_like(x)], axis=-1)
  c2w = cameras.c2w.reshape(cameras.c2w.shape[:1] + (1,) * extra + (3, 3))
  directions = _normalize(jnp.einsum("...ij,...j->...i", c2w, dirs_cam))
  origins = jnp.broadcast_to(
      cameras.positions.reshape(cameras.positions.shape[:1] + (1,) * extra + (3,)),
      directions.shape,
  )
  return origins, directions


def generate_rays(cameras: Cameras, height: int, width: int) -> tuple[Array, Array]:
  """One ray through the centre of every pixel.

  Returns:
    origins (B, H, W, 3) and unit directions (B, H, W, 3).
  """
  j, i = jnp.meshgrid(jnp.arange(width) + 0.5, jnp.arange(height) + 0.5, indexing="xy")
  pixels = jnp.stack([j, i], axis=-1)
  pixels = jnp.broadcast_to(pixels, (cameras.positions.shape[0], height, width, 2))
  return pixel_rays(cameras, pixels, height, width)


def sample_lights(
    key: Array,
    cameras: Cameras,
    *,
    distance_range: Sequence[float] = (0.8, 1.5),
    position_perturb: float = 1.0,
) -> Array:
  """Point lights near each camera, as in DreamFusion.

  The light direction is the camera's direction from the origin plus Gaussian noise of
  std `position_perturb`, renormalised; its distance is uniform in `distance_range`.
  Lighting from roughly the camera's side keeps most visible surfaces lit, while the
  jitter produces the shading variation that reveals geometry.

  Returns:
    (B, 3) light positions.
  """
  k_dir, k_dist = jax.random.split(key)
  b = cameras.positions.shape[0]
  direction = _normalize(cameras.positions + position_perturb * jax.random.normal(k_dir, (b, 3)))
  distance = jax.random.uniform(k_dist, (b, 1), minval=distance_range[0], maxval=distance_range[1])
  return direction * distance


def view_bucket(
    azimuth_deg: Array,
    elevation_deg: Array,
    *,
    overhead_threshold_deg: float = 60.0,
    front_threshold_deg: float = 45.0,
    back_threshold_deg: float = 45.0,
) -> Array:
  """View bucket of each camera for view-dependent prompting (DreamFusion sec. 3.3).

  Overhead when the elevation is above `overhead_threshold_deg`; otherwise front when
  the azimuth is within +-`front_threshold_deg` of 0, back when within
  +-`back_threshold_deg` of 180, and side in between.

  Returns:
    int32 array of the broadcast shape of the inputs, indices into VIEW_BUCKETS.
  """
  az = wrap_degrees(jnp.asarray(azimuth_deg, jnp.float32))
  el = jnp.asarray(elevation_deg, jnp.float32)
  bucket = jnp.full(jnp.broadcast_shapes(az.shape, el.shape), SIDE, jnp.int32)
  bucket = jnp.where(jnp.abs(az) <= front_threshold_deg, FRONT, bucket)
  bucket = jnp.where(jnp.abs(wrap_degrees(az - 180.0)) <= back_threshold_deg, BACK, bucket)
  return jnp.where(el > overhead_threshold_deg, OVERHEAD, bucket).astype(jnp.int32)
