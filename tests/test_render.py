"""Volume renderer and shading against closed forms on analytic fields."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax import cameras, render


def constant_sphere(radius, sigma):
  """Density sigma inside a ball of the given radius, white albedo."""

  def field_fn(x):
    inside = jnp.sum(x**2, axis=-1) < radius**2
    return jnp.where(inside, sigma, 0.0), jnp.ones(x.shape[:-1] + (3,))

  return field_fn


def smooth_sphere(radius, sigma, softness, albedo=(1.0, 1.0, 1.0)):
  """A nearly opaque ball with a smooth boundary, so that -grad(sigma) is the radial normal."""

  def field_fn(x):
    r = jnp.sqrt(jnp.sum(x**2, axis=-1) + 1e-12)
    return sigma * jax.nn.sigmoid((radius - r) / softness), jnp.broadcast_to(jnp.asarray(albedo), x.shape)

  return field_fn


def rays_at_offsets(offsets, distance=3.0):
  """Rays parallel to -x starting at x = distance, offset along y by `offsets`."""
  offsets = jnp.asarray(offsets, jnp.float32)
  origins = jnp.stack([jnp.full_like(offsets, distance), offsets, jnp.zeros_like(offsets)], axis=-1)
  directions = jnp.broadcast_to(jnp.array([-1.0, 0.0, 0.0]), origins.shape)
  return origins, directions


@functools.partial(jax.jit, static_argnames=("field_fn", "num_samples", "bound", "num_importance_samples",
                                             "normal_mode", "ambient", "diffuse"))
def render_eval(field_fn, origins, directions, num_samples, bound=1.0, num_importance_samples=0,
                normal_mode="none", shading=render.ALBEDO, light_positions=None, ambient=0.1, diffuse=0.9,
                background=None):
  return render.render_rays(field_fn, origins, directions, key=None, num_samples=num_samples, bound=bound,
                            deterministic=True, num_importance_samples=num_importance_samples,
                            normal_mode=normal_mode, shading=shading, light_positions=light_positions,
                            ambient=ambient, diffuse=diffuse, background=background)


OFFSETS = [0.0, 0.2, 0.35, 0.45, 0.6]


def test_bounding_sphere_opacity_is_exact():
  """Constant density filling the bounding sphere: the bins tile the chord exactly."""
  sigma, bound = 1.3, 1.0
  origins, dirs = rays_at_offsets(OFFSETS)
  out = render_eval(constant_sphere(bound + 1e-3, sigma), origins, dirs, 32, bound)
  chord = 2 * np.sqrt(np.maximum(bound**2 - np.square(OFFSETS), 0.0))
  np.testing.assert_allclose(out.opacity, 1 - np.exp(-sigma * chord), rtol=1e-5)


def test_constant_density_sphere_opacity():
  """1 - exp(-sigma * chord) for a ball smaller than the bounds, at several offsets."""
  sigma, radius = 2.0, 0.5
  origins, dirs = rays_at_offsets(OFFSETS)
  out = render_eval(constant_sphere(radius, sigma), origins, dirs, 4096)
  chord = 2 * np.sqrt(np.maximum(radius**2 - np.square(OFFSETS), 0.0))
  expected = 1 - np.exp(-sigma * chord)
  hit = chord > 0
  np.testing.assert_allclose(np.asarray(out.opacity)[hit], expected[hit], rtol=1e-3)
  np.testing.assert_allclose(np.asarray(out.opacity)[~hit], 0.0, atol=1e-7)


def test_importance_sampling_finds_the_surface():
  """An opaque ball with 32 coarse samples: depth is off by up to a bin; 64 importance
  samples around the surface bring it within a few thousandths."""
  radius = 0.5
  offsets = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45])
  origins, dirs = rays_at_offsets(offsets)
  expected = 3.0 - np.sqrt(radius**2 - offsets**2)
  coarse = render_eval(constant_sphere(radius, 1e4), origins, dirs, 32)
  fine = render_eval(constant_sphere(radius, 1e4), origins, dirs, 32, num_importance_samples=64)
  err_coarse = np.max(np.abs(np.asarray(coarse.depth) - expected))
  err_fine = np.max(np.abs(np.asarray(fine.depth) - expected))
  assert err_fine < 3e-3
  assert err_fine < 0.1 * err_coarse
  np.testing.assert_allclose(fine.opacity, np.ones_like(offsets), atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 0.25, 0.4])
def test_depth_of_opaque_sphere_is_ray_sphere_distance(offset):
  radius, distance = 0.5, 3.0
  origins, dirs = rays_at_offsets([offset], distance)
  out = render_eval(constant_sphere(radius, 1e4), origins, dirs, 2048)
  expected = distance - np.sqrt(radius**2 - offset**2)
  np.testing.assert_allclose(out.depth, [expected], atol=2e-3)
  np.testing.assert_allclose(out.opacity, [1.0], atol=1e-6)


def test_lambertian_sphere_matches_n_dot_l():
  radius = 0.5
  field_fn = smooth_sphere(radius, 2000.0, 0.002)
  cams = cameras.orbit_cameras(1, elevation_deg=20.0, radius=2.0, fovy_deg=40.0)
  h = w = 24
  origins, dirs = cameras.generate_rays(cams, h, w)
  origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
  light = jnp.array([0.3, 1.5, 1.0])
  out = render_eval(field_fn, origins, dirs, 1024, normal_mode="analytic", shading=render.TEXTURELESS,
                    light_positions=light, ambient=0.0, diffuse=1.0, background=jnp.zeros(3))
  # Closed form: the first ray-sphere hit p, normal p / r, intensity max(0, n . (L - p) / |L - p|).
  b = np.sum(np.asarray(origins) * np.asarray(dirs), -1)
  c = np.sum(np.asarray(origins) ** 2, -1) - radius**2
  disc = b * b - c
  # Compare away from the silhouette, where the soft boundary blurs the hit point.
  interior = disc > 0.05 * radius**2
  t_hit = -b[interior] - np.sqrt(disc[interior])
  p = np.asarray(origins)[interior] + t_hit[:, None] * np.asarray(dirs)[interior]
  to_light = np.asarray(light) - p
  expected = np.maximum(0.0, np.sum(p / radius * to_light, -1) / np.linalg.norm(to_light, axis=-1))
  assert interior.sum() > 100
  np.testing.assert_allclose(np.asarray(out.rgb)[interior, 0], expected, atol=2e-2)
  # Lit and unlit parts both occur, so the check is not trivially satisfied by a constant.
  assert expected.min() < 0.05 and expected.max() > 0.9


def test_analytic_and_finite_difference_normals_agree():
  field_fn = smooth_sphere(0.5, 50.0, 0.2)
  x = jax.random.uniform(jax.random.PRNGKey(0), (64, 3), minval=-0.7, maxval=0.7)
  _, _, n_analytic = render.density_and_normals(field_fn, x, normal_mode="analytic")
  _, _, n_fd = render.density_and_normals(field_fn, x, normal_mode="finite_difference", fd_eps=1e-2)
  np.testing.assert_allclose(n_analytic, n_fd, atol=2e-3)
  np.testing.assert_allclose(n_analytic, x / jnp.linalg.norm(x, axis=-1, keepdims=True), atol=1e-4)


def test_compositing_weights_closed_form():
  density = jax.random.uniform(jax.random.PRNGKey(1), (5, 17)) * 3
  delta = jax.random.uniform(jax.random.PRNGKey(2), (5, 17)) * 0.1
  w = render.compositing_weights(density, delta)
  np.testing.assert_allclose(jnp.sum(w, -1), 1 - jnp.exp(-jnp.sum(density * delta, -1)), rtol=1e-5)
  # Brute force: T_i = prod_{j<i} (1 - alpha_j).
  alpha = 1 - np.exp(-np.asarray(density * delta))
  trans = np.concatenate([np.ones((5, 1)), np.cumprod(1 - alpha, -1)[:, :-1]], -1)
  np.testing.assert_allclose(w, trans * alpha, rtol=1e-5, atol=1e-7)


def test_background_blends_by_transmittance():
  sigma, radius = 1.0, 0.5
  origins, dirs = rays_at_offsets([0.0, 0.3, 0.9])
  bg = jnp.array([0.2, 0.5, 0.8])
  out = render_eval(constant_sphere(radius, sigma), origins, dirs, 256, background=bg)
  # White albedo: rgb = opacity * 1 + (1 - opacity) * bg.
  expected = out.opacity[:, None] + (1 - out.opacity[:, None]) * bg
  np.testing.assert_allclose(out.rgb, expected, atol=1e-6)
  np.testing.assert_allclose(out.rgb[2], bg, atol=1e-7)  # the miss shows the background


def test_stratified_samples_stay_in_their_bins():
  near, far = jnp.array([0.5, 1.0]), jnp.array([2.5, 1.5])
  t, delta = render.stratified_bins(jax.random.PRNGKey(0), near, far, 8, deterministic=False)
  edges = near[:, None] + (far - near)[:, None] * jnp.linspace(0, 1, 9)
  assert np.all((t >= edges[:, :-1]) & (t <= edges[:, 1:]))
  np.testing.assert_allclose(jnp.sum(delta, -1), far - near, rtol=1e-6)
  t_mid, _ = render.stratified_bins(None, near, far, 8, deterministic=True)
  np.testing.assert_allclose(t_mid, 0.5 * (edges[:, :-1] + edges[:, 1:]), rtol=1e-6)


def test_sample_pdf_follows_the_weights():
  edges = jnp.broadcast_to(jnp.linspace(0.0, 4.0, 5), (1, 5))
  weights = jnp.array([[0.0, 3.0, 1.0, 0.0]])
  t = render.sample_pdf(jax.random.PRNGKey(0), edges, weights, 4000, deterministic=False)
  frac_bin1 = float(jnp.mean((t >= 1) & (t < 2)))
  frac_bin2 = float(jnp.mean((t >= 2) & (t < 3)))
  np.testing.assert_allclose([frac_bin1, frac_bin2], [0.75, 0.25], atol=0.02)


def test_shading_modes():
  albedo = jnp.array([[0.2, 0.4, 0.6]])
  normals = jnp.array([[0.0, 0.0, 1.0]])
  pos = jnp.zeros((1, 3))
  light = jnp.array([[0.0, 1.0, 1.0]])  # 45 degrees from the normal
  lit = 0.1 + 0.9 * np.cos(np.pi / 4)
  np.testing.assert_allclose(render.shade(albedo, normals, pos, light, render.ALBEDO), albedo)
  np.testing.assert_allclose(render.shade(albedo, normals, pos, light, render.LAMBERTIAN), albedo * lit, rtol=1e-6)
  np.testing.assert_allclose(render.shade(albedo, normals, pos, light, render.TEXTURELESS), np.full((1, 3), lit),
                             rtol=1e-6)
  below = jnp.array([[0.0, 0.0, -1.0]])
  np.testing.assert_allclose(render.shade(albedo, normals, pos, below, render.LAMBERTIAN), albedo * 0.1, rtol=1e-6)


def test_sample_shading_frequencies():
  modes = render.sample_shading(jax.random.PRNGKey(0), 20000, (0.2, 0.5, 0.3))
  np.testing.assert_allclose(np.bincount(np.asarray(modes), minlength=3) / 20000, [0.2, 0.5, 0.3], atol=0.015)


def test_map_in_chunks_equals_one_pass():
  field_fn = smooth_sphere(0.5, 20.0, 0.05, albedo=(0.9, 0.3, 0.1))
  cams = cameras.orbit_cameras(1, radius=2.0)
  origins, dirs = cameras.generate_rays(cams, 10, 9)
  origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)

  def fn(o, d):
    out = render.render_rays(field_fn, o, d, key=None, num_samples=32, deterministic=True,
                             shading=render.LAMBERTIAN)
    return {"rgb": out.rgb, "depth": out.depth}

  whole = jax.jit(fn)(origins, dirs)
  chunked = jax.jit(lambda o, d: render.map_in_chunks(fn, 16, o, d))(origins, dirs)  # 90 rays: padded
  np.testing.assert_allclose(chunked["rgb"], whole["rgb"], atol=1e-6)
  np.testing.assert_allclose(chunked["depth"], whole["depth"], atol=1e-5)


def test_render_gradient_reaches_the_field():
  """d(opacity)/d(sigma) of a constant ball equals chord * exp(-sigma * chord)."""
  origins, dirs = rays_at_offsets([0.0, 0.3])
  chord = 2 * np.sqrt(1.0 - np.square([0.0, 0.3]))

  def opacity(sigma):
    field_fn = lambda x: (jnp.full(x.shape[:-1], sigma), jnp.ones(x.shape))
    return render.render_rays(field_fn, origins, dirs, key=jax.random.PRNGKey(0), num_samples=16).opacity

  sigma = 0.7
  jac = jax.jacfwd(opacity)(sigma)
  np.testing.assert_allclose(jac, chord * np.exp(-sigma * chord), rtol=1e-4)
