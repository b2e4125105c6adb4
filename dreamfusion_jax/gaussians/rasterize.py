"""A tile rasterizer of 3D Gaussians in pure JAX (Kerbl et al. 2023, no CUDA).

Each Gaussian (mean, scale, rotation quaternion, opacity, colour) is projected to the
image with the EWA Jacobian (Zwicker et al. 2002), its screen covariance dilated by
LOW_PASS_VARIANCE_PX (the reference's anti-aliasing low pass); the image is cut into
square tiles, each tile keeps its `capacity` nearest Gaussians that can reach it, and
every pixel composites them front to back with the reference's alpha rules.

Camera conventions (the same as `cameras.generate_rays`, so both representations see
the same views): a `cameras.Cameras` entry has its centre at `position` and the
camera-to-world rotation `c2w` whose columns are (right, up, backward), OpenGL style;
the camera looks along its local -z. The focal length is
`cameras.focal_length_pixels(fovy_deg, height)` for both axes (square pixels) and the
principal point is the image centre. A camera-space point (x, y, z) with depth d = -z
lands at u = W/2 + f x / d, v = H/2 - f y / d, in pixels whose (0, 0) is the top-left
corner of the top-left pixel, so pixel (i, j) has its centre at (j + 0.5, i + 0.5): the
point where the ray of `cameras.pixel_rays` through (u, v) passes.

What differs from the CUDA reference (diff-gaussian-rasterization), on purpose:
- A Gaussian's screen footprint is the ellipse where its alpha reaches 1/255 (its
  opacity decides how far: alpha >= 1/255 <=> q <= 2 ln(255 o)), bounded by an
  axis-aligned box; the reference uses a 3-sigma circle, which drops some pixels where
  alpha >= 1/255 and keeps many where it is below. Here a tile holds every Gaussian
  that has a pixel above the threshold in it, so without overflow the tiled result
  equals compositing all Gaussians per pixel (tests/test_gaussians.py checks this).
- Each tile keeps at most `capacity` Gaussians (static shapes for XLA): the nearest in
  depth. Dropped ones are counted per tile (`RasterOutput.tile_overflow`), never silent.
- Colours are per-Gaussian RGB (DreamGaussian's spherical-harmonic degree 0), shaded
  by the caller.
Kept from the reference: the Jacobian's x/z, y/z clamp at 1.3 tan(fov / 2), the near
plane, alpha = min(0.99, o exp(-q / 2)), skipping alpha < 1/255, and stopping a pixel
before the Gaussian that would take its transmittance below 1e-4.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dreamfusion_jax import cameras as cameras_lib

Array = jax.Array

LOW_PASS_VARIANCE_PX = 0.3  # added to the screen covariance's diagonal (reference: 0.3)
MAX_ALPHA = 0.99  # reference: min(0.99, ...), so no single Gaussian is fully opaque
MIN_ALPHA = 1.0 / 255.0  # reference: contributions below this are skipped
MIN_TRANSMITTANCE = 1e-4  # reference: a pixel stops before T would fall below this
FRUSTUM_CLAMP = 1.3  # reference: x/z and y/z are clamped at 1.3 tan(fov / 2) in the Jacobian
DEFAULT_NEAR = 0.2  # reference: Gaussians nearer than this (depth) are culled


@flax.struct.dataclass
class Gaussians:
  """N 3D Gaussians, activated (what the rasterizer draws).

  Attributes:
    means: (N, 3) world-space centres.
    scales: (N, 3) positive standard deviations along the Gaussian's own axes.
    rotations: (N, 4) quaternions (w, x, y, z), any non-zero length (normalised here).
    opacities: (N,) in [0, 1].
    colors: (N, 3) in [0, 1].
    active: (N,) bool; inactive Gaussians are not drawn (a fixed-capacity pool's
      empty slots).
  """

  means: Array
  scales: Array
  rotations: Array
  opacities: Array
  colors: Array
  active: Array


@flax.struct.dataclass
class Projection:
  """N Gaussians on the screen of one camera.

  Attributes:
    means2d: (N, 2) centres (u, v) in pixels.
    cov2d: (N, 2, 2) screen covariances in pixels^2, low-pass dilated.
    depths: (N,) camera-space depth -z of the centres.
    extents: (N, 2) half-widths (u, v) in pixels of the box around the ellipse where
      alpha >= MIN_ALPHA.
    visible: (N,) active, in front of the near plane, opaque enough to reach
      MIN_ALPHA, and with a footprint that overlaps the image.
  """

  means2d: Array
  cov2d: Array
  depths: Array
  extents: Array
  visible: Array


@flax.struct.dataclass
class RasterOutput:
  """One rendered image of H x W pixels cut into tiles.

  Attributes:
    rgb: (H, W, 3) colour composited over the background.
    opacity: (H, W) 1 - final transmittance.
    depth: (H, W) expected distance along the pixel's unit ray given termination
      (as render.RenderOutput.depth; 0 where the opacity is 0).
    normals: (H, W, 3) composited world-space normals (not renormalised).
    tile_overflow: (num_tiles,) int32 Gaussians that reached a tile but did not fit its
      capacity (the farthest ones are dropped).
    visible: (N,) the projection's visibility (densification counts views by it).
    radius_px: (N,) the larger half-width of each footprint box, in pixels.
  """

  rgb: Array
  opacity: Array
  depth: Array
  normals: Array
  tile_overflow: Array
  visible: Array
  radius_px: Array


def quaternion_to_rotation(q: Array) -> Array:
  """Rotation matrices of quaternions (w, x, y, z), normalised first.

  Args:
    q: (..., 4).

  Returns:
    (..., 3, 3).
  """
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
  rows = [
      [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
  ]
  return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def covariances_3d(scales: Array, rotations: Array) -> Array:
  """Sigma = R S S^T R^T of each Gaussian.

  Args:
    scales: (N, 3) positive. rotations: (N, 4) quaternions.

  Returns:
    (N, 3, 3) symmetric positive definite.
  """
  m = quaternion_to_rotation(rotations) * scales[..., None, :]  # R S: column k scaled by s_k
  return m @ jnp.swapaxes(m, -1, -2)


def gaussian_normals(scales: Array, rotations: Array, means: Array, camera_position: Array) -> Array:
  """Each Gaussian's shortest axis, turned to face the camera (a flat Gaussian's
  surface normal; DreamGaussian / GaussianShader's choice).

  Args:
    scales: (N, 3). rotations: (N, 4). means: (N, 3). camera_position: (3,).

  Returns:
    (N, 3) unit world-space normals n with n . (camera - mean) >= 0.
  """
  axes = quaternion_to_rotation(rotations)  # columns are the Gaussian's axes
  shortest = jnp.argmin(scales, axis=-1)
  n = jnp.take_along_axis(axes, shortest[:, None, None], axis=-1)[..., 0]
  facing = jnp.sum(n * (camera_position - means), axis=-1, keepdims=True)
  return jnp.where(facing < 0, -n, n)


def footprint_extents(cov2d: Array, opacities: Array) -> Array:
  """Half-widths of the box around {d : o exp(-d^T cov^-1 d / 2) >= MIN_ALPHA}.

  That set is the ellipse d^T cov^-1 d <= c^2 with c^2 = 2 ln(o / MIN_ALPHA), whose
  bounding box has half-widths c sqrt(cov_uu), c sqrt(cov_vv).

  Args:
    cov2d: (N, 2, 2). opacities: (N,).

  Returns:
    (N, 2); zeros where the opacity is below MIN_ALPHA (nothing drawn).
  """
  c2 = 2.0 * jnp.log(jnp.maximum(opacities, MIN_ALPHA) / MIN_ALPHA)
  diag = jnp.stack([cov2d[:, 0, 0], cov2d[:, 1, 1]], axis=-1)
  return jnp.sqrt(c2[:, None] * jnp.maximum(diag, 0.0))


def project(
    g: Gaussians, *, position: Array, c2w: Array, fovy_deg: Array, height: int, width: int,
    near: float = DEFAULT_NEAR,
) -> Projection:
  """Projects N Gaussians into one camera (EWA splatting, Zwicker et al. 2002, eq. 31).

  The screen covariance is J W Sigma W^T J^T with W = c2w^T the world-to-camera
  rotation and J the Jacobian of (u, v) w.r.t. the camera-space point, taken at the
  centre with x/d, y/d clamped to FRUSTUM_CLAMP times the half-field of view (as the
  reference, which keeps J bounded for Gaussians far off screen):
    J = [[f / d, 0, f x / d^2], [0, -f / d, -f y / d^2]]   (d = -z).

  Args:
    g: the Gaussians. position: (3,) camera centre. c2w: (3, 3). fovy_deg: () degrees.
    height, width: image size in pixels.
    near: Gaussians with depth <= near are culled.

  Returns:
    Projection of the N Gaussians.
  """
  focal = cameras_lib.focal_length_pixels(fovy_deg, height)
  p = (g.means - position) @ c2w  # rows: camera-space points, p_cam = c2w^T (mean - position)
  x, y, depth = p[:, 0], p[:, 1], -p[:, 2]
  safe_depth = jnp.where(depth > near, depth, 1.0)
  u = 0.5 * width + focal * x / safe_depth
  v = 0.5 * height - focal * y / safe_depth
  lim_x = FRUSTUM_CLAMP * 0.5 * width / focal
  lim_y = FRUSTUM_CLAMP * 0.5 * height / focal
  xc = jnp.clip(x / safe_depth, -lim_x, lim_x) * safe_depth
  yc = jnp.clip(y / safe_depth, -lim_y, lim_y) * safe_depth
  zero = jnp.zeros_like(x)
  jac = jnp.stack([
      jnp.stack([focal / safe_depth, zero, focal * xc / safe_depth**2], axis=-1),
      jnp.stack([zero, -focal / safe_depth, -focal * yc / safe_depth**2], axis=-1),
  ], axis=-2)  # (N, 2, 3)
  t = jac @ c2w.T  # J W
  cov2d = t @ covariances_3d(g.scales, g.rotations) @ jnp.swapaxes(t, -1, -2)
  cov2d = cov2d + LOW_PASS_VARIANCE_PX * jnp.eye(2, dtype=cov2d.dtype)
  means2d = jnp.stack([u, v], axis=-1)
  extents = jax.lax.stop_gradient(footprint_extents(cov2d, g.opacities))
  lo = jax.lax.stop_gradient(means2d) - extents
  hi = jax.lax.stop_gradient(means2d) + extents
  # A footprint overlaps the image if its box reaches a pixel centre.
  on_screen = (hi[:, 0] >= 0.5) & (lo[:, 0] <= width - 0.5) & (hi[:, 1] >= 0.5) & (lo[:, 1] <= height - 0.5)
  det = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
  visible = g.active & (depth > near) & (g.opacities >= MIN_ALPHA) & (det > 0) & on_screen
  return Projection(means2d=means2d, cov2d=cov2d, depths=depth, extents=extents, visible=visible)


def num_tiles(height: int, width: int, tile_size: int) -> tuple[int, int]:
  """Tiles per column and per row: (ceil(H / T), ceil(W / T))."""
  return -(-height // tile_size), -(-width // tile_size)


def bin_to_tiles(proj: Projection, *, height: int, width: int, tile_size: int, capacity: int
                 ) -> tuple[Array, Array, Array]:
  """The `capacity` nearest visible Gaussians whose footprint box reaches each tile.

  Tile (ty, tx) holds the pixels of rows [ty T, (ty + 1) T) and columns [tx T, (tx + 1) T);
  tiles are numbered row-major. A box reaches a tile if it covers one of the tile's
  pixel centres along both axes.

  Args:
    proj: N projected Gaussians. tile_size: T. capacity: K, Gaussians kept per tile
      (at most N).

  Returns:
    ids (num_tiles, K) int32 Gaussian indices sorted front to back; valid (num_tiles, K)
    bool (False for unused slots); overflow (num_tiles,) int32 Gaussians that reached
    the tile but were dropped for lack of room.
  """
  tiles_y, tiles_x = num_tiles(height, width, tile_size)
  n = proj.depths.shape[0]
  k = min(capacity, n)
  lo = proj.means2d - proj.extents
  hi = proj.means2d + proj.extents

  def overlaps(start_px, size, lo_1d, hi_1d, limit):
    first = start_px + 0.5  # first and last pixel centres of each tile
    last = jnp.minimum(start_px + size, limit) - 0.5
    return (hi_1d[None, :] >= first[:, None]) & (lo_1d[None, :] <= last[:, None])

  starts_x = jnp.arange(tiles_x) * tile_size
  starts_y = jnp.arange(tiles_y) * tile_size
  in_x = overlaps(starts_x, tile_size, lo[:, 0], hi[:, 0], width)  # (tiles_x, N)
  in_y = overlaps(starts_y, tile_size, lo[:, 1], hi[:, 1], height)  # (tiles_y, N)
  hits = (in_y[:, None, :] & in_x[None, :, :] & proj.visible).reshape(tiles_y * tiles_x, n)
  neg_depth = jnp.where(hits, -jax.lax.stop_gradient(proj.depths), -jnp.inf)
  top, ids = jax.lax.top_k(neg_depth, k)  # largest -depth first: nearest first
  count = jnp.sum(hits, axis=-1, dtype=jnp.int32)
  return ids.astype(jnp.int32), top > -jnp.inf, jnp.maximum(count - k, 0)


def composite(alpha: Array, values: Array) -> tuple[Array, Array]:
  """Front-to-back compositing with the reference's stopping rule.

  Gaussian i of a pixel contributes w_i = alpha_i T_i, T_i = prod_{j<i} (1 - alpha_j),
  until the first Gaussian that would bring the transmittance below MIN_TRANSMITTANCE:
  it and all behind it are left out (the reference's `done`).

  Args:
    alpha: (P, K) per-pixel alphas in [0, MAX_ALPHA], front to back.
    values: (K, C) per-Gaussian quantities to composite.

  Returns:
    composited (P, C) sum_i w_i values_i, and final transmittance (P,).
  """
  log_keep = jnp.log1p(-alpha)
  transmittance_after = jnp.exp(jnp.cumsum(log_keep, axis=-1))
  # Transmittance only decreases, so the kept Gaussians are a prefix.
  alpha = jnp.where(transmittance_after >= MIN_TRANSMITTANCE, alpha, 0.0)
  log_keep = jnp.log1p(-alpha)
  log_t = jnp.cumsum(log_keep, axis=-1)
  weights = alpha * jnp.exp(log_t - log_keep)  # exclusive product: T_i
  return weights @ values, jnp.exp(log_t[:, -1])


def pixel_alpha(pixels: Array, means2d: Array, conics: Array, opacities: Array, valid: Array) -> Array:
  """alpha = min(MAX_ALPHA, o exp(-d^T cov^-1 d / 2)), zero below MIN_ALPHA or where
  not valid.

  Args:
    pixels: (P, 2) pixel centres. means2d: (K, 2). conics: (K, 2, 2) inverse screen
    covariances. opacities: (K,). valid: (K,) bool.

  Returns:
    (P, K).
  """
  d = pixels[:, None, :] - means2d[None, :, :]
  q = jnp.einsum("pki,kij,pkj->pk", d, conics, d)
  alpha = jnp.minimum(MAX_ALPHA, opacities[None, :] * jnp.exp(-0.5 * jnp.maximum(q, 0.0)))
  return jnp.where(valid[None, :] & (alpha >= MIN_ALPHA), alpha, 0.0)


def ray_length_per_depth(height: int, width: int, focal: Array, dtype=jnp.float32) -> Array:
  """|(x / f, y / f, -1)| at every pixel centre: a point at depth d along the pixel's
  ray is d times this far from the camera.

  Returns:
    (H, W).
  """
  j, i = jnp.meshgrid(jnp.arange(width, dtype=dtype) + 0.5, jnp.arange(height, dtype=dtype) + 0.5, indexing="xy")
  return jnp.sqrt(1.0 + ((j - 0.5 * width) / focal) ** 2 + ((i - 0.5 * height) / focal) ** 2)


def rasterize(
    g: Gaussians,
    *,
    position: Array,
    c2w: Array,
    fovy_deg: Array,
    height: int,
    width: int,
    background: Array,
    tile_size: int = 16,
    capacity: int = 256,
    near: float = DEFAULT_NEAR,
    screen_offsets: Array | None = None,
) -> RasterOutput:
  """Renders N Gaussians into one H x W image.

  Args:
    g: the Gaussians (colours already shaded).
    position, c2w, fovy_deg: one camera, as one entry of `cameras.Cameras`.
    height, width: image size.
    background: (3,) colour behind the Gaussians, or (H, W, 3) one per pixel.
    tile_size: T, tile side in pixels.
    capacity: K, Gaussians kept per tile (the nearest).
    near: near-plane depth.
    screen_offsets: (N, 2) zeros, or None. Added to the projected centres, so the
      gradient w.r.t. them is the screen-space positional gradient that densification
      accumulates (the reference's `viewspace_points.grad`).

  Returns:
    RasterOutput.
  """
  proj = project(g, position=position, c2w=c2w, fovy_deg=fovy_deg, height=height, width=width, near=near)
  if screen_offsets is not None:
    proj = proj.replace(means2d=proj.means2d + screen_offsets)
  ids, valid, overflow = bin_to_tiles(proj, height=height, width=width, tile_size=tile_size, capacity=capacity)
  normals = gaussian_normals(g.scales, g.rotations, g.means, position)
  conics = jnp.linalg.inv(proj.cov2d)
  values = jnp.concatenate([g.colors, proj.depths[:, None], normals], axis=-1)  # (N, 7)
  tiles_y, tiles_x = num_tiles(height, width, tile_size)
  dtype = g.means.dtype
  local = jnp.arange(tile_size, dtype=dtype) + 0.5
  ty, tx = jnp.meshgrid(jnp.arange(tiles_y), jnp.arange(tiles_x), indexing="ij")
  origins = jnp.stack([tx.ravel(), ty.ravel()], axis=-1).astype(dtype) * tile_size  # (num_tiles, 2) as (u, v)
  lv, lu = jnp.meshgrid(local, local, indexing="ij")
  offsets = jnp.stack([lu.ravel(), lv.ravel()], axis=-1)  # (T*T, 2), row-major within a tile

  def one_tile(origin, tile_ids, tile_valid):
    alpha = pixel_alpha(origin + offsets, proj.means2d[tile_ids], conics[tile_ids], g.opacities[tile_ids],
                        tile_valid)
    return composite(alpha, values[tile_ids])

  acc, transmittance = jax.vmap(one_tile)(origins, ids, valid)  # (num_tiles, T*T, 7), (num_tiles, T*T)

  def to_image(x):
    x = x.reshape((tiles_y, tiles_x, tile_size, tile_size) + x.shape[2:])
    x = jnp.swapaxes(x, 1, 2).reshape((tiles_y * tile_size, tiles_x * tile_size) + x.shape[4:])
    return x[:height, :width]

  acc, transmittance = to_image(acc), to_image(transmittance)
  opacity = 1.0 - transmittance
  rgb = acc[..., :3] + transmittance[..., None] * background
  focal = cameras_lib.focal_length_pixels(fovy_deg, height)
  z = acc[..., 3] / jnp.maximum(opacity, 1e-10)
  depth = jnp.where(opacity > 0, z * ray_length_per_depth(height, width, focal, dtype), 0.0)
  return RasterOutput(rgb=rgb, opacity=opacity, depth=depth, normals=acc[..., 4:], tile_overflow=overflow,
                      visible=proj.visible, radius_px=jnp.max(proj.extents, axis=-1))
