"""Perp-Neg (Armandpour et al. 2023): view-dependent negative prompts whose noise
directions are projected perpendicular to the positive one before they are subtracted,
against multi-faced (Janus) objects.

For a view at azimuth a (0 = front, as cameras.view_bucket) the positive embedding is
interpolated between the view prompts and the other views are negatives, with weights
from threestudio's `use_perp_neg` (its prompt_processors/base.py, the defaults below):

  |a| < 90 (front-side):  r = 1 - |a| / 90,  pos = r front + (1 - r) side,
                          negatives (front, side), weights (-f_fs(r), -f_sf(1 - r));
  |a| >= 90 (side-back):  r = 2 - |a| / 90,  pos = r side + (1 - r) back,
                          negatives (side, front), weights (-f_sb(r), -f_fsb(r));
  overhead bucket:        pos = overhead, no negatives (weights 0),

f(r) = a exp(-b r) + c with (a, b, c): f_fs = f_sf = (4, 0.5, -2.426) (zero at r = 1: a
pure front view is not pushed away from "front"), f_sb = (1, 0.5, -0.606), f_fsb =
(1, 0.5, 0.967). The guided prediction is then

  eps_hat = eps_u + s (e_pos + sum_i w_i perp(e_neg_i, e_pos)),
  e_x = eps(z_t; x) - eps(z_t; uncond),  perp(x, y) = x - (<x, y> / <y, y>) y per image,

one UNet call on a batch of 4B (uncond, positive, two negatives). We use these weights
unchanged because they are the ones threestudio users know; on the toy prior, whose
objects have no faces, they are measured only for harm (docs/guidance.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

F_FS = (4.0, 0.5, -2.426)
F_SF = (4.0, 0.5, -2.426)
F_SB = (1.0, 0.5, -0.606)
F_FSB = (1.0, 0.5, 0.967)
FRONT, SIDE, BACK, OVERHEAD = 0, 1, 2, 3  # cameras.VIEW_BUCKETS


def _decay(f, r: Array) -> Array:
  a, b, c = f
  return a * jnp.exp(-b * r) + c


def perpendicular_component(x: Array, y: Array) -> Array:
  """x minus its projection on y, per image: (B, ...) -> (B, ...)."""
  flat_x, flat_y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
  coef = jnp.sum(flat_x * flat_y, axis=-1) / jnp.maximum(jnp.sum(flat_y * flat_y, axis=-1), 1e-20)
  return x - coef.reshape((-1,) + (1,) * (x.ndim - 1)) * y


def view_conditioning(cond: Array, uncond: Array, azimuth_deg: Array, buckets: Array) -> dict:
  """The Perp-Neg conditioning of a batch of views.

  Args:
    cond: (4, L, D) the view prompts' embeddings (front, side, back, overhead).
    uncond: (L, D). azimuth_deg: (B,). buckets: (B,) int32 view buckets.

  Returns:
    {"pos": (B, L, D), "neg": (B, 2, L, D), "neg_weights": (B, 2)}.
  """
  azi = jnp.abs((azimuth_deg + 180.0) % 360.0 - 180.0)
  front_side = azi < 90.0
  r = jnp.where(front_side, 1.0 - azi / 90.0, 2.0 - azi / 90.0)
  rr = r[:, None, None]
  pos = jnp.where(front_side[:, None, None], rr * cond[FRONT] + (1 - rr) * cond[SIDE],
                  rr * cond[SIDE] + (1 - rr) * cond[BACK])
  neg = jnp.where(front_side[:, None, None, None], jnp.stack([cond[FRONT], cond[SIDE]])[None],
                  jnp.stack([cond[SIDE], cond[FRONT]])[None])
  weights = jnp.where(front_side[:, None], jnp.stack([-_decay(F_FS, r), -_decay(F_SF, 1 - r)], -1),
                      jnp.stack([-_decay(F_SB, r), -_decay(F_FSB, r)], -1))
  overhead = buckets == OVERHEAD
  pos = jnp.where(overhead[:, None, None], cond[OVERHEAD], pos)
  neg = jnp.where(overhead[:, None, None, None], uncond, neg)
  weights = jnp.where(overhead[:, None], 0.0, weights)
  return {"pos": pos, "neg": neg, "neg_weights": weights}


def guidance_direction(eps_u: Array, eps_pos: Array, eps_neg: Array, weights: Array) -> Array:
  """e_pos + sum_i w_i perp(e_neg_i, e_pos): (B, ...); eps_neg (B, 2, ...), weights (B, 2)."""
  e_pos = eps_pos - eps_u
  out = e_pos
  for i in range(eps_neg.shape[1]):
    w = weights[:, i].reshape((-1,) + (1,) * (e_pos.ndim - 1))
    out = out + w * perpendicular_component(eps_neg[:, i] - eps_u, e_pos)
  return out
