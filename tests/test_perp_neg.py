"""Perp-Neg's pieces in closed form (guidance/perp_neg.py); the guided prediction
against an independent computation is in test_stable_diffusion.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dreamfusion_jax.guidance import perp_neg


def test_perpendicular_component_is_orthogonal_and_complements_the_projection():
  x, y = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 4, 2))
  p = np.asarray(perp_neg.perpendicular_component(x, y))
  for b in range(3):
    assert abs(np.dot(p[b].ravel(), np.asarray(y[b]).ravel())) < 1e-4
    rest = np.asarray(x[b]).ravel() - p[b].ravel()  # the projection: parallel to y
    cos = np.dot(rest, np.asarray(y[b]).ravel()) / np.linalg.norm(rest) / np.linalg.norm(np.asarray(y[b]))
    assert abs(abs(cos) - 1) < 1e-5


def test_view_conditioning_follows_the_interpolation_and_weights():
  cond = jnp.arange(4 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 3)  # front, side, back, overhead
  uncond = -jnp.ones((2, 3))
  azimuth = jnp.array([0.0, 45.0, 90.0, -135.0, 180.0, 10.0])
  buckets = jnp.array([0, 0, 1, 2, 2, 3])  # the last is overhead
  out = perp_neg.view_conditioning(cond, uncond, azimuth, buckets)
  f = lambda a, b, c, r: a * math.exp(-b * r) + c
  front, side, back, over = (np.asarray(cond[i]) for i in range(4))
  np.testing.assert_allclose(out["pos"][0], front)
  np.testing.assert_allclose(out["pos"][1], 0.5 * front + 0.5 * side)
  np.testing.assert_allclose(out["pos"][2], side)
  np.testing.assert_allclose(out["pos"][3], 0.5 * side + 0.5 * back)
  np.testing.assert_allclose(out["pos"][4], back)
  np.testing.assert_allclose(out["pos"][5], over)
  np.testing.assert_allclose(out["neg"][0], np.stack([front, side]))
  np.testing.assert_allclose(out["neg"][2], np.stack([side, front]))
  np.testing.assert_allclose(out["neg"][4], np.stack([side, front]))
  np.testing.assert_allclose(out["neg"][5], np.stack([uncond, uncond]))
  want = [[-f(4, .5, -2.426, 1.0), -f(4, .5, -2.426, 0.0)],  # pure front: ~0 against "front", -1.574 against "side"
          [-f(4, .5, -2.426, .5), -f(4, .5, -2.426, .5)],
          [-f(1, .5, -.606, 1.0), -f(1, .5, .967, 1.0)],  # |a| = 90: the side-back branch (as threestudio), r = 1
          [-f(1, .5, -.606, .5), -f(1, .5, .967, .5)],
          [-f(1, .5, -.606, 0.0), -f(1, .5, .967, 0.0)],
          [0.0, 0.0]]
  np.testing.assert_allclose(out["neg_weights"], want, rtol=1e-5, atol=1e-6)
  assert abs(want[0][0]) < 1e-3 and abs(want[0][1] + 1.574) < 1e-3
  # Continuous at 90 degrees: both branches push away from "front" by ~1.574 there.
  assert abs(want[2][1] - (-f(4, .5, -2.426, 0.0))) < 1e-3
