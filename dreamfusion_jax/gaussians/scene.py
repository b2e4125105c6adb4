"""The Gaussian scene: the pool and the rasterizer behind the interface of
`dreamfusion_jax.scene` (render training views, render evaluation views, a density
field for export), plus the pool's upkeep after each optimiser step.

Parameters: {"field": {"gaussians": pool parameters, "pool": per-slot bookkeeping},
"background": ...}. The bookkeeping (active mask, accumulated screen gradients) rides
in the parameters as float arrays that no loss depends on and the optimiser freezes
(`state.make_optimizer` labels them), so checkpoints, bit-exact resume, pmap
replication, export and restoring a run carry it with nothing added to the TrainState.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from dreamfusion_jax import cameras as cameras_lib
from dreamfusion_jax import fields, losses, render
from dreamfusion_jax.gaussians import pool as pool_lib
from dreamfusion_jax.gaussians import rasterize

Array = jax.Array
POOL_STATS = ("active", "grad_accum", "grad_count", "max_radius_px")


@dataclasses.dataclass(frozen=True)
class GaussianSettings:
  """Static settings of the Gaussian scene (config.gaussians; see configs/toy_gaussians.py)."""

  capacity: int
  num_points: int
  init_radius: float
  init_opacity: float
  tile_size: int
  tile_capacity: int
  near: float
  densify_from: int
  densify_until: int
  densify_every: int
  opacity_reset_every: int
  grad_threshold: float
  percent_dense: float
  extent: float
  min_opacity: float
  max_radius_px: float
  mesh_threshold: float
  export_block: int
  bound: float
  ambient: float
  diffuse: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "GaussianSettings":
    gs, r = config.gaussians, config.render
    return cls(**{f.name: gs[f.name] for f in dataclasses.fields(cls) if f.name in gs},
               bound=r.bound, ambient=r.ambient, diffuse=r.diffuse)


@dataclasses.dataclass(frozen=True)
class GaussianScene:
  """Module definitions and settings (no parameters); hashable."""

  settings: GaussianSettings
  background: Optional[fields.BackgroundMLP]

  def init(self, key: Array) -> dict:
    s = self.settings
    k_pool, k_bg = jax.random.split(key)
    gaussians, stats = pool_lib.init_pool(k_pool, capacity=s.capacity, num_points=s.num_points,
                                          radius=s.init_radius, opacity=s.init_opacity)
    params = {"field": {"gaussians": gaussians, "pool": _stats_to_params(stats)}, "background": {}}
    if self.background is not None:
      params["background"] = self.background.init(k_bg, jnp.zeros((1, 3)))["params"]
    return params

  def level_mask(self, step: Array) -> None:
    del step
    return None

  def stats(self, params: dict) -> pool_lib.DensifyStats:
    return _stats_from_params(params["field"]["pool"])

  def gaussians(self, params: dict) -> rasterize.Gaussians:
    return pool_lib.activate(params["field"]["gaussians"], self.stats(params).active)

  def screen_probes(self, batch_size: int) -> Array:
    """Zeros (B, C, 2) whose gradient is each view's screen-space positional gradient."""
    return jnp.zeros((batch_size, self.settings.capacity, 2), jnp.float32)

  def _rasterize(self, g, cam_position, c2w, fovy, *, height, width, background, offsets=None):
    s = self.settings
    return rasterize.rasterize(g, position=cam_position, c2w=c2w, fovy_deg=fovy, height=height, width=width,
                               background=background, tile_size=s.tile_size, capacity=s.tile_capacity, near=s.near,
                               screen_offsets=offsets)

  def _background(self, params, cams, height, width):
    if self.background is None:
      return None
    _, directions = cameras_lib.generate_rays(cams, height, width)
    return self.background.apply({"params": params["background"]}, directions)

  def render_views(self, params: dict, cams: cameras_lib.Cameras, *, height: int, width: int,
                   keys: Optional[Array], light_positions: Array, shading: Array, solid_background: Array,
                   use_solid_background: Array, level_mask=None, screen_probes: Optional[Array] = None) -> dict:
    """`scene.render_views` for Gaussians: each Gaussian is shaded (render.shade with
    its shortest axis as normal) before compositing. No randomness (keys unused); the
    orientation loss has no samples along rays here and is 0.

    Returns:
      scene.render_views's dict, plus "pool_views" (visible (B, C), radius_px (B, C)) for
      densification and "metrics" (B,) per image: "tile_overflow" (Gaussians dropped
      from full tiles), "num_active".
    """
    del keys, level_mask
    s = self.settings
    g = self.gaussians(params)
    b = cams.positions.shape[0]
    bg_mlp = self._background(params, cams, height, width)
    if screen_probes is None:
      screen_probes = jnp.zeros((b, s.capacity, 2), g.means.dtype)

    def one_image(position, c2w, fovy, light, mode, solid, use_solid, bg_image, offsets):
      normals = rasterize.gaussian_normals(g.scales, g.rotations, g.means, position)
      colors = render.shade(g.colors, normals, g.means, light, mode, ambient=s.ambient, diffuse=s.diffuse)
      background = solid if bg_image is None else jnp.where(use_solid, solid, bg_image)
      out = self._rasterize(g.replace(colors=colors), position, c2w, fovy, height=height, width=width,
                            background=background, offsets=offsets)
      return {
          "rgb": out.rgb, "opacity": out.opacity, "depth": out.depth, "normals": out.normals,
          "orientation": jnp.zeros((), out.rgb.dtype),
          "opacity_sparsity": losses.opacity_loss(out.opacity.reshape(-1)),
          "opacity_entropy": losses.opacity_entropy_loss(out.opacity.reshape(-1)),
          "pool_views": {"visible": out.visible, "radius_px": out.radius_px},
          "metrics": {"tile_overflow": jnp.sum(out.tile_overflow).astype(jnp.float32),
                      "num_active": jnp.sum(g.active).astype(jnp.float32)},
      }

    bg_axis = None if bg_mlp is None else 0
    return jax.vmap(one_image, in_axes=(0, 0, 0, 0, 0, 0, 0, bg_axis, 0))(
        cams.positions, cams.c2w, cams.fovy_deg, light_positions, shading, solid_background,
        use_solid_background, bg_mlp, screen_probes)

  def render_eval_views(self, params: dict, cams: cameras_lib.Cameras, *, height: int, width: int,
                        chunk_size: int = 0, shading: int = render.ALBEDO, level_mask=None) -> dict:
    """`scene.render_eval_views` for Gaussians: light at the camera, normals as
    colours over white. One image at a time (lax.map) to bound memory."""
    del chunk_size, level_mask
    s = self.settings
    g = self.gaussians(params)
    bg_mlp = self._background(params, cams, height, width)
    if bg_mlp is None:
      bg_mlp = jnp.ones((cams.positions.shape[0], height, width, 3), jnp.float32)

    def one_image(args):
      position, c2w, fovy, bg = args
      normals = rasterize.gaussian_normals(g.scales, g.rotations, g.means, position)
      colors = render.shade(g.colors, normals, g.means, position, shading, ambient=s.ambient, diffuse=s.diffuse)
      out = self._rasterize(g.replace(colors=colors), position, c2w, fovy, height=height, width=width,
                            background=bg)
      n = out.normals / jnp.maximum(jnp.linalg.norm(out.normals, axis=-1, keepdims=True), 1e-6)
      normal_rgb = out.opacity[..., None] * (n + 1.0) * 0.5 + (1.0 - out.opacity[..., None])
      return {"rgb": out.rgb, "opacity": out.opacity, "depth": out.depth, "normals": normal_rgb}

    return jax.lax.map(one_image, (cams.positions, cams.c2w, cams.fovy_deg, bg_mlp))

  def render_albedo(self, params: dict, cams: cameras_lib.Cameras, *, size: int) -> tuple[Array, Array]:
    """Albedo renders over black, as toy_score's ray-marched `render_albedo` gives for a
    field: opacity (B, size, size) and rgb (B, size, size, 3) = sum_i w_i albedo_i."""
    g = self.gaussians(params)

    def one_image(args):
      position, c2w, fovy = args
      out = self._rasterize(g, position, c2w, fovy, height=size, width=size, background=jnp.zeros(3))
      return out.opacity, out.rgb

    return jax.lax.map(one_image, (cams.positions, cams.c2w, cams.fovy_deg))

  def after_update(self, *, step: Array, key: Array, params: dict, opt_state, probe_grads: Array,
                   views: dict, height: int, width: int, axis_name: Optional[str]) -> tuple[dict, object, dict]:
    """The pool's upkeep after the optimiser step that took the state from `step` to
    `step + 1` (DreamGaussian's schedule, counted in steps taken): inside
    [densify_from, densify_until], accumulate the views' screen gradients; every
    densify_every steps clone/split and prune; every opacity_reset_every steps reset
    opacities. Rewritten slots start with zero Adam moments, as new tensors do in the
    reference. Statistics are gathered over devices, so D devices x batch b equal one
    device x batch D b.

    Returns:
      params, opt_state, and scalar metrics.
    """
    s = self.settings
    taken = step + 1
    in_window = (taken >= s.densify_from) & (taken <= s.densify_until)
    stats = self.stats(params)
    delta = pool_lib.accumulate(_zero_stats(stats), probe_grads, views["visible"], views["radius_px"],
                                height=height, width=width)
    if axis_name:
      # Each device's loss averages its own views, the step's loss all devices' views:
      # a view's gradient of the step's loss is its device's gradient / D, so the sum of
      # their norms over all views is the mean over devices of each device's sum.
      delta = delta.replace(grad_accum=jax.lax.pmean(delta.grad_accum, axis_name),
                            grad_count=jax.lax.psum(delta.grad_count, axis_name),
                            max_radius_px=jax.lax.pmax(delta.max_radius_px, axis_name))
    stats = jax.tree_util.tree_map(lambda old, new: jnp.where(in_window, new, old), stats, stats.replace(
        grad_accum=stats.grad_accum + delta.grad_accum, grad_count=stats.grad_count + delta.grad_count,
        max_radius_px=jnp.maximum(stats.max_radius_px, delta.max_radius_px)))
    gaussians = params["field"]["gaussians"]

    def densify_and_prune(args):
      gaussians, stats = args
      out = pool_lib.densify(key, gaussians, stats, grad_threshold=s.grad_threshold,
                             percent_dense=s.percent_dense, extent=s.extent)
      pruned = pool_lib.prune(out.params, out.stats, min_opacity=s.min_opacity, max_scale=0.1 * s.extent,
                              max_radius_px=s.max_radius_px)
      counts = jnp.stack([out.num_cloned, out.num_split, out.num_dropped,
                          jnp.sum(out.stats.active) - jnp.sum(pruned.active)]).astype(jnp.float32)
      return out.params, pruned, out.written, counts

    def unchanged(args):
      gaussians, stats = args
      return gaussians, stats, jnp.zeros_like(stats.active), jnp.zeros((4,), jnp.float32)

    densify_now = in_window & (taken % s.densify_every == 0)
    gaussians, stats, written, counts = jax.lax.cond(densify_now, densify_and_prune, unchanged, (gaussians, stats))
    reset_now = in_window & (taken % s.opacity_reset_every == 0)
    gaussians = jax.lax.cond(reset_now, pool_lib.reset_opacity, lambda p: p, gaussians)
    opt_state = _zero_moments(opt_state, written)
    params = {**params, "field": {"gaussians": gaussians, "pool": _stats_to_params(stats)}}
    metrics = dict(zip(("num_cloned", "num_split", "num_dropped", "num_pruned"), counts))
    return params, opt_state, metrics

  def field_fn(self, params: dict, level_mask=None):
    """The Gaussians as a density field for export (DreamGaussian's extract_fields):
    density(x) = sum_i o_i exp(-(x - mu_i)^T Sigma_i^-1 (x - mu_i) / 2) over active
    Gaussians, and albedo the density-weighted mean colour. Sums over the pool in
    blocks of `export_block` Gaussians (lax.scan) to bound memory; each block's
    quadratic forms are one (points x 10) @ (10 x block) matmul of expanded terms
    (float32 cancellation costs ~1e-7 |x|^2 / sigma^2 in the exponent: 1e-3 at
    sigma = 0.01).

    Returns:
      positions (..., 3) -> (density (...,), albedo (..., 3)).
    """
    del level_mask
    g = self.gaussians(params)
    block = min(self.settings.export_block, self.settings.capacity)
    num_blocks = -(-self.settings.capacity // block)
    pad = num_blocks * block - self.settings.capacity
    precision = jnp.linalg.inv(rasterize.covariances_3d(g.scales, g.rotations))
    weight = jnp.where(g.active, g.opacities, 0.0)

    def blocks(x):
      x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
      return x.reshape((num_blocks, block) + x.shape[1:])

    def fn(positions):
      flat = positions.reshape(-1, 3)
      features = quadratic_features(flat)  # (P, 10)

      def add_block(carry, blk):
        coeffs, w, color = blk
        # (x - mu)^T P (x - mu) for every point and Gaussian as one matmul.
        q = jnp.maximum(jnp.dot(features, coeffs.T, precision=jax.lax.Precision.HIGHEST), 0.0)
        contrib = w * jnp.exp(-0.5 * q)
        return (carry[0] + jnp.sum(contrib, -1), carry[1] + contrib @ color), None

      init = (jnp.zeros(flat.shape[:1]), jnp.zeros(flat.shape[:1] + (3,)))
      (density, rgb), _ = jax.lax.scan(add_block, init, (blocks(quadratic_coefficients(g.means, precision)),
                                                          blocks(weight), blocks(g.colors)))
      albedo = rgb / jnp.maximum(density, 1e-8)[:, None]
      return density.reshape(positions.shape[:-1]), albedo.reshape(positions.shape[:-1] + (3,))

    return fn

  @property
  def mesh_threshold(self) -> float:
    return self.settings.mesh_threshold


def quadratic_features(x: Array) -> Array:
  """(x^2, y^2, z^2, xy, xz, yz, x, y, z, 1) of points (P, 3) -> (P, 10)."""
  a, b, c = x[:, 0], x[:, 1], x[:, 2]
  return jnp.stack([a * a, b * b, c * c, a * b, a * c, b * c, a, b, c, jnp.ones_like(a)], axis=-1)


def quadratic_coefficients(means: Array, precision: Array) -> Array:
  """Coefficients (K, 10) with quadratic_features(x) . coeffs_k = (x - mu_k)^T P_k (x - mu_k).

  Args:
    means: (K, 3). precision: (K, 3, 3) symmetric inverse covariances.
  """
  p = precision
  pm = jnp.einsum("kij,kj->ki", p, means)
  return jnp.stack([p[:, 0, 0], p[:, 1, 1], p[:, 2, 2], 2 * p[:, 0, 1], 2 * p[:, 0, 2], 2 * p[:, 1, 2],
                    -2 * pm[:, 0], -2 * pm[:, 1], -2 * pm[:, 2], jnp.sum(means * pm, -1)], axis=-1)


def _stats_to_params(stats: pool_lib.DensifyStats) -> dict:
  return {"active": stats.active.astype(jnp.float32), "grad_accum": stats.grad_accum,
          "grad_count": stats.grad_count, "max_radius_px": stats.max_radius_px}


def _stats_from_params(p: dict) -> pool_lib.DensifyStats:
  p = jax.lax.stop_gradient(p)
  return pool_lib.DensifyStats(active=p["active"] > 0.5, grad_accum=p["grad_accum"], grad_count=p["grad_count"],
                               max_radius_px=p["max_radius_px"])


def _zero_stats(stats: pool_lib.DensifyStats) -> pool_lib.DensifyStats:
  zeros = jnp.zeros_like(stats.grad_accum)
  return stats.replace(grad_accum=zeros, grad_count=zeros, max_radius_px=zeros)


def _zero_moments(opt_state, slots: Array):
  """Zeros the optimiser's per-parameter arrays (Adam's moments) of the Gaussians in
  `slots` (C,): every opt-state leaf under a "gaussians" key with C rows."""
  capacity = slots.shape[0]

  def zero(path, x):
    under = any(getattr(k, "key", None) == "gaussians" for k in path)
    if under and hasattr(x, "ndim") and x.ndim >= 1 and x.shape[0] == capacity:
      return jnp.where(slots.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x)
    return x

  return jax.tree_util.tree_map_with_path(zero, opt_state)


def build_scene(config: ml_collections.ConfigDict) -> GaussianScene:
  """The Gaussian scene of `config.gaussians`, `config.background`, `config.render`."""
  bg = config.background
  if bg.kind not in ("mlp", "fixed", "random"):
    raise ValueError(f"config.background.kind must be mlp, fixed or random; got {bg.kind!r}")
  background = (fields.BackgroundMLP(num_frequencies=bg.num_frequencies, hidden_dim=bg.hidden_dim)
                if bg.kind == "mlp" else None)
  return GaussianScene(settings=GaussianSettings.from_config(config), background=background)
