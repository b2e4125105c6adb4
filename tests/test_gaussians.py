"""The Gaussian rasterizer against closed forms and a brute-force per-pixel reference
written here in numpy (projection with a finite-difference Jacobian, rotations from
scipy), and its gradients against finite differences in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dreamfusion_jax import cameras
from dreamfusion_jax.gaussians import rasterize as rast


# ---------------------------------------------------------------------------------
# An independent numpy reference.


def np_camera(cams, b=0):
  return (np.asarray(cams.positions[b], np.float64), np.asarray(cams.c2w[b], np.float64),
          float(cams.fovy_deg[b]))


def np_pixel_of(point, position, c2w, fovy_deg, height, width):
  """Pinhole projection written from the intrinsics and extrinsics: focal from the
  vertical field of view, principal point at the image centre, image rows downwards."""
  f = 0.5 * height / np.tan(0.5 * np.deg2rad(fovy_deg))
  right, up, backward = c2w[:, 0], c2w[:, 1], c2w[:, 2]
  rel = point - position
  depth = -rel @ backward
  return np.array([0.5 * width + f * (rel @ right) / depth, 0.5 * height - f * (rel @ up) / depth]), depth


def np_screen_gaussian(mean, scale, quat_wxyz, position, c2w, fovy_deg, height, width):
  """Projected mean, dilated screen covariance (Jacobian of the projection by central
  differences) and depth of one Gaussian."""
  rot = Rotation.from_quat(np.roll(quat_wxyz, -1)).as_matrix()  # scipy: (x, y, z, w)
  sigma = rot @ np.diag(np.square(scale)) @ rot.T
  uv, depth = np_pixel_of(mean, position, c2w, fovy_deg, height, width)
  h = 1e-6
  jac = np.stack([(np_pixel_of(mean + h * e, position, c2w, fovy_deg, height, width)[0]
                   - np_pixel_of(mean - h * e, position, c2w, fovy_deg, height, width)[0]) / (2 * h)
                  for e in np.eye(3)], axis=-1)
  return uv, jac @ sigma @ jac.T + 0.3 * np.eye(2), depth, rot


def np_alpha(pixel, uv, cov, opacity):
  d = pixel - uv
  return min(0.99, opacity * np.exp(-0.5 * d @ np.linalg.solve(cov, d)))


def np_reference_render(g, position, c2w, fovy_deg, height, width, background, keep=None):
  """Every pixel composites all Gaussians sorted by depth, no tiles, with the CUDA
  reference's rules; `keep(i, j)` optionally restricts the Gaussians a pixel sees."""
  n = len(g["opacities"])
  screen = [np_screen_gaussian(g["means"][k], g["scales"][k], g["rotations"][k], position, c2w, fovy_deg, height,
                               width) for k in range(n)]
  order = np.argsort([s[2] for s in screen])
  f = 0.5 * height / np.tan(0.5 * np.deg2rad(fovy_deg))
  rgb = np.zeros((height, width, 3))
  opacity = np.zeros((height, width))
  depth = np.zeros((height, width))
  normals = np.zeros((height, width, 3))
  for i in range(height):
    for j in range(width):
      pixel = np.array([j + 0.5, i + 0.5])
      t, c, z, nrm = 1.0, np.zeros(3), 0.0, np.zeros(3)
      for k in order:
        uv, cov, dep, rot = screen[k]
        if dep <= 0.2 or (keep is not None and not keep(i, j, k)):
          continue
        a = np_alpha(pixel, uv, cov, g["opacities"][k])
        if a < 1 / 255:
          continue
        if t * (1 - a) < 1e-4:
          break
        axis = rot[:, np.argmin(g["scales"][k])]
        axis = axis if axis @ (position - g["means"][k]) >= 0 else -axis
        c, z, nrm = c + a * t * g["colors"][k], z + a * t * dep, nrm + a * t * axis
        t *= 1 - a
      ray = np.array([(j + 0.5 - 0.5 * width) / f, -(i + 0.5 - 0.5 * height) / f, -1.0])
      rgb[i, j] = c + t * background
      opacity[i, j] = 1 - t
      depth[i, j] = z / (1 - t) * np.linalg.norm(ray) if t < 1 else 0.0
      normals[i, j] = nrm
  return {"rgb": rgb, "opacity": opacity, "depth": depth, "normals": normals}


# ---------------------------------------------------------------------------------


def make_gaussians(means, scales, rotations, opacities, colors, dtype=jnp.float32):
  n = len(opacities)
  return rast.Gaussians(means=jnp.asarray(means, dtype), scales=jnp.asarray(scales, dtype),
                        rotations=jnp.asarray(rotations, dtype), opacities=jnp.asarray(opacities, dtype),
                        colors=jnp.asarray(colors, dtype), active=jnp.ones((n,), bool))


def render(g, cams, b=0, **kwargs):
  kwargs.setdefault("background", jnp.zeros(3, g.means.dtype))
  return rast.rasterize(g, position=cams.positions[b].astype(g.means.dtype), c2w=cams.c2w[b].astype(g.means.dtype),
                        fovy_deg=cams.fovy_deg[b].astype(g.means.dtype), **kwargs)


def random_scene(seed, n, spread=0.25):
  rng = np.random.default_rng(seed)
  return {
      "means": rng.normal(0, spread, (n, 3)),
      "scales": np.exp(rng.uniform(np.log(0.03), np.log(0.15), (n, 3))),
      "rotations": rng.normal(size=(n, 4)),
      "opacities": rng.uniform(0.3, 0.95, n),
      "colors": rng.uniform(0, 1, (n, 3)),
  }


def normalized(g):
  return dict(g, rotations=g["rotations"] / np.linalg.norm(g["rotations"], axis=-1, keepdims=True))


CAMS = cameras.orbit_cameras(3, elevation_deg=25.0, radius=1.6, fovy_deg=50.0, start_azimuth_deg=20.0)


@pytest.mark.parametrize("view", [0, 1, 2])
def test_one_gaussian_alpha_is_its_projected_2d_gaussian(view):
  """(a) With one Gaussian, the rendered opacity at every pixel is min(0.99, o G(p)),
  G the 2D Gaussian of the projected, dilated covariance (0 below 1/255)."""
  h, w = 24, 20
  g = normalized(random_scene(7, 1, spread=0.1))
  g["scales"], g["opacities"] = np.array([[0.12, 0.07, 0.03]]), np.array([0.9])
  out = render(make_gaussians(**g), CAMS, view, height=h, width=w, tile_size=8, capacity=4)
  position, c2w, fovy = np_camera(CAMS, view)
  uv, cov, _, _ = np_screen_gaussian(g["means"][0], g["scales"][0], g["rotations"][0], position, c2w, fovy, h, w)
  expected = np.array([[np_alpha(np.array([j + 0.5, i + 0.5]), uv, cov, g["opacities"][0]) for j in range(w)]
                       for i in range(h)])
  expected = np.where(expected >= 1 / 255, expected, 0.0)
  assert (expected > 0.3).sum() >= 4 and (expected == 0).sum() >= 20  # a footprint inside the image
  np.testing.assert_allclose(out.opacity, expected, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out.rgb, expected[..., None] * g["colors"][0], atol=2e-5, rtol=1e-4)


def test_gaussian_lands_where_the_nerf_ray_passes_it():
  """A small Gaussian on the ray that cameras.generate_rays shoots through pixel (i, j)
  projects onto that pixel's centre, covers that pixel most, and its depth there is
  the distance along the ray."""
  h, w = 16, 12
  cams = cameras.sample_cameras(jax.random.PRNGKey(3), 3, camera_perturb=0.1, center_perturb=0.2, up_perturb=0.05)
  origins, dirs = cameras.generate_rays(cams, h, w)
  for b, (i, j, t) in enumerate([(3, 4, 1.1), (12, 9, 0.9), (7, 2, 1.3)]):
    point = origins[b, i, j] + t * dirs[b, i, j]
    g = make_gaussians([point], [[0.004] * 3], [[1.0, 0, 0, 0]], [0.9], [[1.0, 1.0, 1.0]])
    proj = rast.project(g, position=cams.positions[b], c2w=cams.c2w[b], fovy_deg=cams.fovy_deg[b], height=h,
                        width=w)
    np.testing.assert_allclose(proj.means2d[0], [j + 0.5, i + 0.5], atol=1e-4)
    out = render(g, cams, b, height=h, width=w, tile_size=4, capacity=2)
    assert np.unravel_index(np.argmax(out.opacity), (h, w)) == (i, j)
    np.testing.assert_allclose(out.depth[i, j], t, rtol=1e-5)


@pytest.mark.parametrize("tile_size,height,width", [(4, 10, 14), (8, 16, 16), (16, 12, 9)])
def test_overlapping_gaussians_match_brute_force(tile_size, height, width):
  """(b) Tiles change nothing while no tile overflows: rgb, opacity, depth and normals
  equal a per-pixel composite of all Gaussians sorted by depth."""
  g = normalized(random_scene(11, 12))
  background = np.array([0.2, 0.5, 0.9])
  out = render(make_gaussians(**g), CAMS, 1, height=height, width=width, tile_size=tile_size, capacity=12,
               background=jnp.asarray(background, jnp.float32))
  ref = np_reference_render(g, *np_camera(CAMS, 1), height, width, background)
  assert int(np.sum(out.tile_overflow)) == 0
  assert ref["opacity"].max() > 0.9 and ref["opacity"].min() < 0.05  # overlaps and empty space both in view
  for name in ("rgb", "opacity", "depth", "normals"):
    np.testing.assert_allclose(getattr(out, name), ref[name], atol=1e-4, rtol=1e-4, err_msg=name)


def test_many_opaque_layers_stop_at_the_transmittance_floor():
  """Ten nearly opaque Gaussians stacked under a camera looking straight down: the
  reference stops before T < 1e-4, so at the centre only the two nearest (red, then
  blue; T = 1 - 0.99 after each) show, and the third (green) does not."""
  means = [[0.0, 0.0, 0.05 * k] for k in range(10)]
  colors = np.eye(3)[[[0, 2, 1][(9 - k) % 3] for k in range(10)]]  # from the top (k = 9): red, blue, green, ...
  g = dict(means=np.array(means), scales=np.full((10, 3), 0.5), rotations=np.tile([1.0, 0, 0, 0], (10, 1)),
           opacities=np.full(10, 0.999), colors=colors)
  cams = cameras.orbit_cameras(1, elevation_deg=90.0, radius=2.0, fovy_deg=40.0)
  out = render(make_gaussians(**g), cams, height=8, width=8, tile_size=4, capacity=10)
  ref = np_reference_render(g, *np_camera(cams), 8, 8, np.zeros(3))
  np.testing.assert_allclose(out.rgb, ref["rgb"], atol=1e-5)
  red, green, blue = np.asarray(out.rgb[4, 4])
  # Without the stopping rule the third layer would add T alpha ~ 4e-4 of green.
  assert red > 0.95 and blue > 0.01 and green == 0.0


def test_overflow_is_counted_and_keeps_the_nearest():
  """Six Gaussians stacked along the view axis reach the same tiles; with room for
  four, each tile counts two dropped and renders the four nearest exactly."""
  cams = cameras.orbit_cameras(1, elevation_deg=0.0, radius=2.0, fovy_deg=40.0)
  means = np.array([[0.1 * k - 0.25, 0.0, 0.0] for k in range(6)])  # the camera sits on +x
  rng = np.random.default_rng(0)
  g = dict(means=means, scales=np.full((6, 3), 0.05), rotations=np.tile([1.0, 0, 0, 0], (6, 1)),
           opacities=np.full(6, 0.3), colors=rng.uniform(size=(6, 3)))
  out = render(make_gaussians(**g), cams, height=8, width=8, tile_size=8, capacity=4)
  assert out.tile_overflow.tolist() == [2]
  nearest = set(np.argsort(-means[:, 0])[:4].tolist())  # largest x: nearest the camera
  ref = np_reference_render(g, *np_camera(cams), 8, 8, np.zeros(3), keep=lambda i, j, k: k in nearest)
  full = np_reference_render(g, *np_camera(cams), 8, 8, np.zeros(3))
  np.testing.assert_allclose(out.rgb, ref["rgb"], atol=1e-5)
  assert np.abs(full["rgb"] - ref["rgb"]).max() > 1e-3  # the dropped two did matter


def test_culling():
  """Behind the camera, nearer than the near plane, off screen, inactive, or below
  1/255 opacity: not visible and not drawn."""
  cams = cameras.orbit_cameras(1, elevation_deg=0.0, radius=2.0, fovy_deg=40.0)  # at +x, looking at -x
  means = [[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.9, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
  g = make_gaussians(means, np.full((6, 3), 0.05), np.tile([1.0, 0, 0, 0], (6, 1)),
                     [0.9, 0.9, 0.9, 0.9, 0.9, 0.003], np.ones((6, 3)))
  g = g.replace(active=jnp.array([True, True, True, True, False, True]))
  out = render(g, cams, height=16, width=16, tile_size=8, capacity=6)
  assert out.visible.tolist() == [True, False, False, False, False, False]
  alone = render(jax.tree_util.tree_map(lambda x: x[:1], g), cams, height=16, width=16, tile_size=8, capacity=6)
  np.testing.assert_array_equal(out.rgb, alone.rgb)


def test_vmapped_jitted_and_pmapped_renders_agree():
  g = make_gaussians(**normalized(random_scene(5, 6)))

  def render_all(g, cams):
    return jax.vmap(lambda p, r, f: rast.rasterize(g, position=p, c2w=r, fovy_deg=f, height=12, width=12,
                                                   background=jnp.ones(3), tile_size=4, capacity=6).rgb
                    )(cams.positions, cams.c2w, cams.fovy_deg)

  eager = np.stack([render(g, CAMS, b, height=12, width=12, background=jnp.ones(3), tile_size=4, capacity=6).rgb
                    for b in range(3)])
  np.testing.assert_allclose(jax.jit(render_all)(g, CAMS), eager, atol=1e-6)
  one = jax.tree_util.tree_map(lambda x: x[None], CAMS)
  pmapped = jax.pmap(render_all, in_axes=(None, 0))(g, jax.tree_util.tree_map(lambda x: x[:, :1], one))
  np.testing.assert_allclose(pmapped[0], eager[:1], atol=1e-6)


FIELDS = ("means", "scales", "rotations", "opacities", "colors")


def test_gradients_match_finite_differences():
  """(c) Autodiff through projection, binning and compositing equals central
  differences in float64, for every Gaussian parameter."""
  g = random_scene(21, 4, spread=0.12)
  g["scales"] = np.array([[0.15, 0.08, 0.04], [0.1, 0.05, 0.12], [0.06, 0.14, 0.09], [0.11, 0.03, 0.07]])
  g["opacities"] = np.array([0.7, 0.5, 0.8, 0.6])
  h, w = 10, 12
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    weights = {k: jnp.asarray(rng.normal(size=s)) for k, s in
               (("rgb", (h, w, 3)), ("opacity", (h, w)), ("depth", (h, w)), ("normals", (h, w, 3)))}
    cams = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), CAMS)

    def loss(params):
      out = render(make_gaussians(**params, dtype=jnp.float64), cams, 2, height=h, width=w, tile_size=4,
                   capacity=4, background=jnp.asarray([0.3, 0.6, 0.1]))
      return sum(jnp.sum(weights[k] * getattr(out, k)) for k in weights)

    params = {k: jnp.asarray(v, jnp.float64) for k, v in g.items()}
    grads = jax.jit(jax.grad(loss))(params)
    loss_jit = jax.jit(loss)
    eps = 1e-6
    for name in FIELDS:
      flat = np.asarray(params[name]).ravel()
      numeric = np.zeros_like(flat)
      for idx in range(flat.size):
        plus, minus = flat.copy(), flat.copy()
        plus[idx] += eps
        minus[idx] -= eps
        shape = params[name].shape
        numeric[idx] = (loss_jit({**params, name: jnp.asarray(plus.reshape(shape))})
                        - loss_jit({**params, name: jnp.asarray(minus.reshape(shape))})) / (2 * eps)
      analytic = np.asarray(grads[name]).ravel()
      assert np.abs(numeric).max() > 1e-2, name  # the loss depends on every field
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6 * np.abs(numeric).max(), err_msg=name)
