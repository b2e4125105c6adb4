"""Regularizers of the optimised scene, as pure functions of rendering outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def orientation_loss(weights: Array, normals: Array, directions: Array) -> Array:
  """DreamFusion's orientation loss (appendix A.2), mean over rays.

  L = sum_i stop_grad(w_i) max(0, n_i . d)^2: normals facing away from the camera
  (same side as the ray direction d) are visible only through a semi-transparent
  surface; penalising them pushes density to form front-facing surfaces. The weights
  are not differentiated, as in DreamFusion, so the loss shapes normals, not opacity.

  Args:
    weights: (N, S) compositing weights. normals: (N, S, 3) unit normals.
    directions: (N, 3) unit ray directions.

  Returns:
    scalar.
  """
  cos = jnp.sum(normals * directions[:, None, :], axis=-1)
  return jnp.mean(jnp.sum(jax.lax.stop_gradient(weights) * jnp.maximum(cos, 0.0) ** 2, axis=-1))


def opacity_loss(opacity: Array) -> Array:
  """Sparsity regulariser mean(sqrt(opacity^2 + 0.01)) (stable-dreamfusion, threestudio).

  A smoothed L1 on accumulated opacity: it discourages filling empty space with low
  density "fog" while staying differentiable at 0.

  Args:
    opacity: (...,) accumulated opacity per ray.
  """
  return jnp.mean(jnp.sqrt(opacity**2 + 0.01))


def opacity_entropy_loss(opacity: Array, eps: float = 1e-5) -> Array:
  """Binary entropy of per-ray opacity, mean: pushes rays to be empty or opaque.

  Args:
    opacity: (...,) in [0, 1].
  """
  o = jnp.clip(opacity, eps, 1.0 - eps)
  return jnp.mean(-o * jnp.log(o) - (1.0 - o) * jnp.log(1.0 - o))


def ramped_weight(step: Array, weight: float, warmup_steps: int) -> Array:
  """weight * min(1, step / warmup_steps): a linear ramp from 0 (constant when 0 steps)."""
  if warmup_steps <= 0:
    return jnp.asarray(weight, jnp.float32)
  return weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def reference_view_loss(rgb: Array, opacity: Array, target_rgb: Array, target_mask: Array,
                        background: Array) -> tuple[Array, Array]:
  """Image-to-3D's supervision of the input view (Zero-1-to-3's systems in
  threestudio and stable-dreamfusion): the render at the input's camera against the
  input composited over the render's own background, and its opacity against the mask.

  Args:
    rgb: (H, W, 3) the render. opacity: (H, W).
    target_rgb: (H, W, 3) the input image. target_mask: (H, W) its mask in [0, 1].
    background: (3,) the render's background colour.

  Returns:
    (mean squared colour error, mean squared mask error), scalars.
  """
  m = target_mask[..., None]
  target = target_rgb * m + background * (1.0 - m)
  return jnp.mean((rgb - target) ** 2), jnp.mean((opacity - target_mask) ** 2)
