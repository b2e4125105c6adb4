"""The fixed-capacity Gaussian pool: initialisation, densification, pruning, opacity
reset, and the screen-space gradient that drives densification."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax import cameras
from dreamfusion_jax.gaussians import pool
from dreamfusion_jax.gaussians import rasterize as rast


def test_init_matches_dreamgaussian():
  params, stats = pool.init_pool(jax.random.PRNGKey(0), capacity=3000, num_points=2000, radius=0.5)
  assert all(params[k].shape[0] == 3000 for k in pool.PARAM_NAMES)
  assert int(stats.active.sum()) == 2000 and bool(stats.active[:2000].all())
  means = np.asarray(params["means"][:2000])
  r = np.linalg.norm(means, axis=-1)
  assert r.max() <= 0.5
  # Uniform in the ball: P(r < 0.5 x) = x^3.
  np.testing.assert_allclose(np.mean(r < 0.25), 1 / 8, atol=0.025)
  np.testing.assert_allclose(np.mean(means, 0), 0.0, atol=0.02)
  # Scale: the root mean squared distance to the 3 nearest neighbours, brute force.
  d2 = np.sum((means[:50, None] - means[None]) ** 2, -1)
  expected = np.sqrt(np.mean(np.sort(d2, -1)[:, 1:4], -1))
  np.testing.assert_allclose(np.exp(params["log_scales"][:50, 0]), expected, rtol=1e-4)
  g = pool.activate(params, stats.active)
  np.testing.assert_allclose(g.opacities[:2000], 0.1, rtol=1e-5)
  assert float(jnp.abs(g.colors[:2000] - 0.5).max()) <= 1 / 255 + 1e-6


def small_pool(capacity=10):
  """Six active Gaussians: 0, 1 small (clone if their gradient is high), 2 large
  (split), 3 faint (prune), 4 huge (prune), 5 quiet; slots 6.. free."""
  params, stats = pool.init_pool(jax.random.PRNGKey(1), capacity=capacity, num_points=6, radius=0.5)
  log_scales = np.log(np.array([[0.01, 0.02, 0.01], [0.02] * 3, [0.2, 0.05, 0.1], [0.02] * 3, [0.6, 0.1, 0.1],
                                [0.02] * 3] + [[0.02] * 3] * (capacity - 6)))
  opacity_logits = np.full(capacity, pool.logit(0.5))
  opacity_logits[3] = pool.logit(0.004)
  rng = np.random.default_rng(0)
  params = {**params, "log_scales": jnp.asarray(log_scales, jnp.float32),
            "opacity_logits": jnp.asarray(opacity_logits, jnp.float32),
            "rotations": jnp.asarray(rng.normal(size=(capacity, 4)), jnp.float32),
            "color_logits": jnp.asarray(rng.normal(size=(capacity, 3)), jnp.float32)}
  grads = np.array([0.05, 0.03, 0.04, 0.0, 0.0, 0.001] + [0.0] * (capacity - 6))
  stats = stats.replace(grad_accum=jnp.asarray(2 * grads, jnp.float32), grad_count=jnp.full((capacity,), 2.0))
  return params, stats


DENSIFY = dict(grad_threshold=0.01, percent_dense=0.01, extent=4.0)  # DreamGaussian: clone if max scale <= 0.04


def test_densify_clones_small_and_splits_large_in_free_slots():
  """(d) Three qualify: 0 and 1 are cloned, 2 is split; the free slots 6, 7, 8 take
  them in order of gradient (0, 2, 1); shapes stay, the active count grows by 3."""
  params, stats = small_pool()
  out = jax.jit(lambda k, p, s: pool.densify(k, p, s, **DENSIFY))(jax.random.PRNGKey(2), params, stats)
  assert jax.tree_util.tree_map(jnp.shape, out.params) == jax.tree_util.tree_map(jnp.shape, params)
  assert out.stats.active.tolist() == [True] * 9 + [False]
  assert (int(out.num_cloned), int(out.num_split), int(out.num_dropped)) == (2, 1, 0)
  assert out.written.tolist() == [False, False, True, False, False, False, True, True, True, False]
  for slot, src in ((6, 0), (8, 1)):  # exact clones
    for name in pool.PARAM_NAMES:
      np.testing.assert_array_equal(out.params[name][slot], params[name][src])
  # The split: two halves (slot 2 and slot 7) with scales / 1.6, same rotation and colour,
  # means spread around the original by about its scale.
  for slot in (2, 7):
    np.testing.assert_allclose(np.exp(out.params["log_scales"][slot]), np.exp(params["log_scales"][2]) / 1.6,
                               rtol=1e-5)
    np.testing.assert_array_equal(out.params["rotations"][slot], params["rotations"][2])
    np.testing.assert_array_equal(out.params["color_logits"][slot], params["color_logits"][2])
  assert not np.allclose(out.params["means"][2], out.params["means"][7])
  assert float(jnp.linalg.norm(out.params["means"][7] - params["means"][2])) < 4 * 0.2
  for name in pool.PARAM_NAMES:  # untouched slots keep their values
    np.testing.assert_array_equal(np.asarray(out.params[name])[[0, 1, 3, 4, 5]], np.asarray(params[name])[[0, 1, 3, 4, 5]])
  assert float(out.stats.grad_accum.sum()) == 0.0 and float(out.stats.grad_count.sum()) == 0.0


def test_split_offsets_follow_the_rotated_scales():
  """Split halves are drawn from N(mean, R S^2 R^T): their empirical covariance over many
  splits matches the original Gaussian's."""
  capacity = 4000
  rot = np.array([0.9, 0.3, -0.2, 0.4])
  params = {"means": jnp.zeros((capacity, 3)), "log_scales": jnp.log(jnp.tile(jnp.array([0.3, 0.1, 0.05]),
                                                                            (capacity, 1))),
            "rotations": jnp.tile(jnp.asarray(rot, jnp.float32), (capacity, 1)),
            "opacity_logits": jnp.zeros(capacity), "color_logits": jnp.zeros((capacity, 3))}
  active = jnp.arange(capacity) < capacity // 2
  stats = pool.DensifyStats(active=active, grad_accum=jnp.ones(capacity), grad_count=jnp.ones(capacity),
                            max_radius_px=jnp.zeros(capacity))
  out = pool.densify(jax.random.PRNGKey(0), params, stats, **DENSIFY)
  assert int(out.num_split) == capacity // 2
  samples = np.asarray(out.params["means"])
  r = np.asarray(rast.quaternion_to_rotation(jnp.asarray(rot)))
  expected = r @ np.diag([0.09, 0.01, 0.0025]) @ r.T
  np.testing.assert_allclose(np.cov(samples.T), expected, atol=4e-3)


def test_densify_without_room_counts_the_dropped():
  """Capacity 8 leaves two free slots for three qualifying Gaussians: the two with the
  largest gradient (0, 2) get them, the third (1) is counted as dropped."""
  params, stats = small_pool(capacity=8)
  out = pool.densify(jax.random.PRNGKey(2), params, stats, **DENSIFY)
  assert int(out.stats.active.sum()) == 8
  assert (int(out.num_cloned), int(out.num_split), int(out.num_dropped)) == (1, 1, 1)
  for name in pool.PARAM_NAMES:
    np.testing.assert_array_equal(out.params[name][6], params[name][0])
    np.testing.assert_array_equal(out.params[name][1], params[name][1])


def test_prune_frees_faint_and_large():
  """(d) Opacity below 0.01 (slot 3) or largest scale above 0.1 extent = 0.4 (slot 4)
  is freed; with a screen limit, a footprint that grew past it too (slot 5)."""
  params, stats = small_pool()
  pruned = jax.jit(lambda p, s: pool.prune(p, s, min_opacity=0.01, max_scale=0.4))(params, stats)
  assert pruned.active.tolist() == [True, True, True, False, False, True] + [False] * 4
  stats = stats.replace(max_radius_px=jnp.asarray([1.0, 2, 3, 1, 1, 50, 0, 0, 0, 0], jnp.float32))
  pruned = pool.prune(params, stats, min_opacity=0.01, max_scale=0.4, max_radius_px=20.0)
  assert int(pruned.active.sum()) == 3
  # Freed slots are reused by the next densify.
  regrown = pool.densify(jax.random.PRNGKey(0), params, pruned.replace(grad_accum=stats.grad_accum,
                                                                       grad_count=stats.grad_count), **DENSIFY)
  assert int(regrown.stats.active.sum()) == 6 and bool(regrown.stats.active[3])


def test_reset_opacity_caps_at_one_hundredth():
  params, _ = small_pool()
  reset = pool.reset_opacity(params)
  opacity = jax.nn.sigmoid(reset["opacity_logits"])
  np.testing.assert_allclose(opacity, np.minimum(jax.nn.sigmoid(params["opacity_logits"]), 0.01), rtol=1e-5)
  assert float(opacity[3]) < 0.005  # a fainter one is not raised


def test_screen_offsets_carry_the_2d_positional_gradient():
  """The gradient w.r.t. zero screen offsets is d loss / d (u, v) of the drawn centres
  (central differences of shifted centres, float64), and `accumulate` adds its norm in
  NDC units (times W / 2, H / 2)."""
  with jax.enable_x64(True):
    params, stats = pool.init_pool(jax.random.PRNGKey(3), capacity=6, num_points=6, radius=0.3)
    params = {k: v.astype(jnp.float64) for k, v in params.items()}
    params = {**params, "log_scales": params["log_scales"] + 1.0, "opacity_logits": params["opacity_logits"] + 2.0}
    cams = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), cameras.orbit_cameras(1, radius=1.5))
    target = jax.random.uniform(jax.random.PRNGKey(4), (12, 12, 3), jnp.float64)

    @jax.jit
    def loss(offsets):
      g = pool.activate(params, stats.active)
      out = rast.rasterize(g, position=cams.positions[0], c2w=cams.c2w[0], fovy_deg=cams.fovy_deg[0], height=12,
                           width=12, background=jnp.zeros(3), tile_size=4, capacity=6, screen_offsets=offsets)
      return jnp.sum((out.rgb - target) ** 2)

    zeros = jnp.zeros((6, 2), jnp.float64)
    g_screen = jax.grad(loss)(zeros)
    eps = 1e-5
    numeric = np.array([[(loss(zeros.at[n, i].set(eps)) - loss(zeros.at[n, i].set(-eps))) / (2 * eps)
                         for i in range(2)] for n in range(6)])
    assert np.abs(numeric).max() > 1e-2
    np.testing.assert_allclose(g_screen, numeric, rtol=1e-5, atol=1e-8)
  accumulated = pool.accumulate(stats, jnp.asarray(g_screen, jnp.float32)[None], jnp.ones((1, 6), bool),
                                jnp.ones((1, 6)), height=12, width=12)
  np.testing.assert_allclose(accumulated.grad_accum, np.linalg.norm(numeric * 6.0, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(accumulated.grad_count, 1.0)
