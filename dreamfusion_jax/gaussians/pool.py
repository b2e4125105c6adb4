"""A fixed-capacity pool of 3D Gaussians, optimised and densified as DreamGaussian does
(Tang et al. 2023, after Kerbl et al. 2023), with static shapes throughout.

The pool holds `capacity` slots; `active` marks the ones in use. Densification writes
new Gaussians into free slots instead of growing arrays, pruning clears `active`, and
an opacity reset rewrites values in place, so every function here keeps the shapes and
runs under jit, pmap and checkpoints without recompiling.

Parameters (what the optimiser sees), one row per slot:
  means (C, 3), log_scales (C, 3), rotations (C, 4) quaternions (w, x, y, z), not
  normalised, opacity_logits (C,), color_logits (C, 3).
Activations: scale = exp, opacity = sigmoid (as the reference), colour = sigmoid (the
reference stores degree-0 spherical harmonics, colour = 0.5 + C0 f; a sigmoid keeps the
colour in [0, 1] without the clamp).

Densification statistics (`DensifyStats`), accumulated over the views that saw each
Gaussian: the norm of its screen-space positional gradient, in the reference's NDC
units (d loss / d(pixel) times (W / 2, H / 2): the CUDA backward's ddelx_dx = 0.5 W),
so the reference's thresholds carry over, and the largest screen footprint it had.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from dreamfusion_jax.gaussians import rasterize

Array = jax.Array

PARAM_NAMES = ("means", "log_scales", "rotations", "opacity_logits", "color_logits")


@flax.struct.dataclass
class DensifyStats:
  """Per-slot state that is not optimised.

  Attributes:
    active: (C,) bool, slots in use.
    grad_accum: (C,) sum over views of |screen-space positional gradient| (NDC units).
    grad_count: (C,) views in which the Gaussian was visible since the last densify.
    max_radius_px: (C,) largest footprint half-width (pixels) since the last densify.
  """

  active: Array
  grad_accum: Array
  grad_count: Array
  max_radius_px: Array


def logit(p: float) -> float:
  return math.log(p / (1.0 - p))


def sample_ball(key: Array, num_points: int, radius: float) -> Array:
  """Uniform points in a ball (the reference's cube-root radius, uniform direction).

  Returns:
    (num_points, 3).
  """
  k_dir, k_r = jax.random.split(key)
  direction = jax.random.normal(k_dir, (num_points, 3))
  direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
  r = radius * jnp.cbrt(jax.random.uniform(k_r, (num_points, 1)))
  return direction * r


def mean_neighbour_distance(points: Array, num_neighbours: int = 3) -> Array:
  """sqrt of the mean squared distance to the nearest `num_neighbours` other points
  (the reference's distCUDA2 initial scale), floored at sqrt(1e-7) as the reference.

  Args:
    points: (P, 3).

  Returns:
    (P,).
  """

  def one(p):
    d2 = jnp.sum((points - p) ** 2, axis=-1)
    nearest = -jax.lax.top_k(-d2, num_neighbours + 1)[0][1:]  # drop the point itself
    return jnp.mean(nearest)

  return jnp.sqrt(jnp.maximum(jax.lax.map(one, points, batch_size=256), 1e-7))


def init_pool(key: Array, *, capacity: int, num_points: int, radius: float, opacity: float = 0.1,
              color_jitter: float = 1.0 / 255.0) -> tuple[dict, DensifyStats]:
  """DreamGaussian's start: `num_points` Gaussians uniform in a ball of `radius`,
  isotropic with scale the mean distance to their 3 nearest neighbours, identity
  rotation, opacity 0.1, colour 0.5 plus a uniform jitter of up to `color_jitter`
  (the reference draws SH DC in [0, 1/255]: near grey). Slots past `num_points` are free.

  Returns:
    params (dict of PARAM_NAMES, leading dim `capacity`), stats.
  """
  if not 0 < num_points <= capacity:
    raise ValueError(f"num_points must be in (0, capacity={capacity}], got {num_points}")
  k_pos, k_col = jax.random.split(key)
  points = sample_ball(k_pos, num_points, radius)
  log_scale = jnp.log(mean_neighbour_distance(points))
  pad = capacity - num_points

  def padded(x):
    return jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])

  colors = 0.5 + color_jitter * jax.random.uniform(k_col, (num_points, 3))
  params = {
      "means": padded(points),
      "log_scales": padded(jnp.repeat(log_scale[:, None], 3, axis=1)),
      "rotations": padded(jnp.tile(jnp.array([1.0, 0.0, 0.0, 0.0]), (num_points, 1))),
      "opacity_logits": padded(jnp.full((num_points,), logit(opacity))),
      "color_logits": padded(jnp.log(colors / (1.0 - colors))),
  }
  params["rotations"] = params["rotations"].at[num_points:, 0].set(1.0)  # free slots hold valid quaternions
  zeros = jnp.zeros((capacity,), jnp.float32)
  stats = DensifyStats(active=jnp.arange(capacity) < num_points, grad_accum=zeros, grad_count=zeros,
                       max_radius_px=zeros)
  return params, stats


def activate(params: dict, active: Array) -> rasterize.Gaussians:
  """The rasterizer's Gaussians from the pool's parameters."""
  return rasterize.Gaussians(means=params["means"], scales=jnp.exp(params["log_scales"]),
                             rotations=params["rotations"], opacities=jax.nn.sigmoid(params["opacity_logits"]),
                             colors=jax.nn.sigmoid(params["color_logits"]), active=active)


def accumulate(stats: DensifyStats, screen_grads: Array, visible: Array, radius_px: Array, *, height: int,
               width: int) -> DensifyStats:
  """Adds a batch of V views' screen-space gradients to the statistics.

  Args:
    stats: the pool's statistics.
    screen_grads: (V, C, 2) d loss / d (u, v) in pixels, per view.
    visible: (V, C) bool.
    radius_px: (V, C) footprint half-widths.
    height, width: image size (for the NDC scaling).

  Returns:
    updated stats.
  """
  ndc = screen_grads * jnp.asarray([0.5 * width, 0.5 * height], screen_grads.dtype)
  norm = jnp.where(visible, jnp.linalg.norm(ndc, axis=-1), 0.0)
  return stats.replace(
      grad_accum=stats.grad_accum + jnp.sum(norm, axis=0),
      grad_count=stats.grad_count + jnp.sum(visible, axis=0).astype(stats.grad_count.dtype),
      max_radius_px=jnp.maximum(stats.max_radius_px, jnp.max(jnp.where(visible, radius_px, 0.0), axis=0)))


@flax.struct.dataclass
class DensifyResult:
  """What `densify` did.

  Attributes:
    params, stats: the new pool (stats reset, as the reference does after densifying).
    written: (C,) bool, slots whose parameters were (re)written: new Gaussians and
      split originals. Their optimiser moments should start from zero.
    num_cloned, num_split: scalars.
    num_dropped: scalar, Gaussians that qualified but found no free slot.
  """

  params: dict
  stats: DensifyStats
  written: Array
  num_cloned: Array
  num_split: Array
  num_dropped: Array


def densify(key: Array, params: dict, stats: DensifyStats, *, grad_threshold: float, percent_dense: float,
            extent: float) -> DensifyResult:
  """Clone and split Gaussians whose mean screen-space gradient reaches the threshold.

  As the reference's densify_and_clone / densify_and_split: a qualifying Gaussian no
  larger than `percent_dense * extent` (its largest scale) is cloned (an exact copy); a
  larger one is split in two, each drawn at mean + R (s * n), n ~ N(0, I), with scales
  s / 1.6; the original slot holds one half, a free slot the other. Gaussians take free
  slots in order of decreasing gradient; those left without one are counted, not lost
  silently (they stay as they are).

  Returns:
    DensifyResult.
  """
  capacity = stats.active.shape[0]
  grads = jnp.where(stats.grad_count > 0, stats.grad_accum / jnp.maximum(stats.grad_count, 1.0), 0.0)
  qualifies = stats.active & (grads >= grad_threshold)
  scales = jnp.exp(params["log_scales"])
  is_large = jnp.max(scales, axis=-1) > percent_dense * extent
  order = jnp.argsort(jnp.where(qualifies, -grads, jnp.inf))  # qualifying first, largest gradient first
  free_slots = jnp.argsort(stats.active)  # stable: free slots first, in index order
  rank = jnp.arange(capacity)
  assigned = (rank < jnp.sum(qualifies)) & (rank < jnp.sum(~stats.active))
  # source[slot]: the Gaussian a newly written slot copies from (capacity: none).
  source = jnp.full((capacity,), capacity).at[jnp.where(assigned, free_slots, capacity)].set(order, mode="drop")
  is_new = source < capacity
  src = jnp.minimum(source, capacity - 1)
  was_split = jnp.zeros((capacity,), bool).at[jnp.where(assigned, order, capacity)].set(True, mode="drop") & is_large
  # A slot takes a split half if it is a split original or a new slot whose source was split.
  split_from = jnp.where(is_new, src, rank)
  takes_half = jnp.where(is_new, is_large[src], was_split)
  rot = rasterize.quaternion_to_rotation(params["rotations"][split_from])
  offset = jnp.einsum("cij,cj->ci", rot, scales[split_from] * jax.random.normal(key, (capacity, 3)))
  new = {name: jnp.where(is_new.reshape((-1,) + (1,) * (x.ndim - 1)), x[src], x) for name, x in params.items()}
  new["means"] = jnp.where(takes_half[:, None], params["means"][split_from] + offset, new["means"])
  new["log_scales"] = jnp.where(takes_half[:, None], params["log_scales"][split_from] - math.log(1.6),
                                new["log_scales"])
  zeros = jnp.zeros_like(stats.grad_accum)
  new_stats = DensifyStats(active=stats.active | is_new, grad_accum=zeros, grad_count=zeros, max_radius_px=zeros)
  num_assigned = jnp.sum(assigned)
  num_split = jnp.sum(was_split)
  return DensifyResult(params=new, stats=new_stats, written=is_new | was_split,
                       num_cloned=num_assigned - num_split, num_split=num_split,
                       num_dropped=jnp.sum(qualifies) - num_assigned)


def prune(params: dict, stats: DensifyStats, *, min_opacity: float, max_scale: float,
          max_radius_px: float = 0.0) -> DensifyStats:
  """Frees the slots of Gaussians with opacity below `min_opacity`, a largest scale
  above `max_scale` (the reference's 0.1 extent) or, if `max_radius_px` > 0, a screen
  footprint that exceeded it since the last densify (the reference's max_screen_size)."""
  too_faint = jax.nn.sigmoid(params["opacity_logits"]) < min_opacity
  too_large = jnp.max(jnp.exp(params["log_scales"]), axis=-1) > max_scale
  if max_radius_px > 0:
    too_large = too_large | (stats.max_radius_px > max_radius_px)
  return stats.replace(active=stats.active & ~too_faint & ~too_large)


def reset_opacity(params: dict, *, value: float = 0.01) -> dict:
  """The reference's periodic reset: opacity = min(opacity, value)."""
  return {**params, "opacity_logits": jnp.minimum(params["opacity_logits"], logit(value))}
