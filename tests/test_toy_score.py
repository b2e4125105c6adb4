"""The toy world's 3D scores against closed forms and hand-made fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax import cameras, toy_score, toy_world

SOFTNESS, MAX_DENSITY = 0.02, 300.0  # toy_world.object_field's defaults, restated as the closed forms' inputs
# Where the ground truth's density crosses the occupancy threshold: 300 sigmoid(-d / 0.02) = thr.
SURFACE_OFFSET = SOFTNESS * np.log(MAX_DENSITY / toy_score.OCCUPANCY_DENSITY - 1.0)


def test_mask_iou_closed_form():
  a, b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
  a[0:10, 0:10] = True
  b[5:15, 0:10] = True  # overlap 50 of a union of 150
  assert toy_score.mask_iou(a, b) == pytest.approx(1 / 3)
  assert toy_score.mask_iou(a, np.zeros_like(a)) == 0.0
  assert toy_score.mask_iou(np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_margin_is_own_minus_best_other():
  ious = {"cube": 0.8, "sphere": 0.6, "cone": 0.3, "torus": 0.7}
  assert toy_score.margin(ious, "cube") == pytest.approx(0.1)
  assert toy_score.margin(ious, "sphere") == pytest.approx(-0.2)


def test_centre_opacity_and_mean_albedo_closed_forms():
  image = np.zeros((64, 64))
  image[30:34, 30:34] = 1.0
  image[29, :] = 1.0  # just outside the patch
  assert toy_score.centre_opacity(image) == 1.0
  image[30:32, 30:34] = 0.0
  assert toy_score.centre_opacity(image) == 0.5
  # Two pixels, opacity 1 and 0.6, albedo c: the over-black render is opacity * c.
  c = np.array([0.2, 0.4, 0.6])
  opacity = np.array([1.0, 0.6, 0.1])
  rgb = opacity[:, None] * c + np.array([[0, 0, 0], [0, 0, 0], [5.0, 5.0, 5.0]])  # the third is not in the mask
  np.testing.assert_allclose(toy_score.mean_albedo(rgb, opacity), c, rtol=1e-6)


def test_score_cameras_ring_the_object_at_four_elevations():
  cams = toy_score.score_cameras()
  assert cams.positions.shape == (32, 3)
  np.testing.assert_allclose(np.linalg.norm(cams.positions, axis=-1), 1.7, rtol=1e-6)
  z = np.asarray(cams.positions[:, 2]).reshape(4, 8)
  np.testing.assert_allclose(z, 1.7 * np.sin(np.radians([[-10.0], [15.0], [45.0], [75.0]])) * np.ones((1, 8)),
                             atol=1e-5)
  top = toy_score.top_camera()
  np.testing.assert_allclose(top.c2w[0, :, 2], [0.0, 0.0, 1.0], atol=1e-6)  # looks straight down


def test_sphere_silhouette_is_its_projected_disc():
  # Each view of a sphere of radius r at distance 1.7 is a disc of radius f r / sqrt(1.7^2 - r^2) pixels; the
  # mask edge lies between the nominal radius and the soft surface's reach (~0.12 beyond it).
  opacity = toy_score.ground_truth("sphere")["opacity"]
  focal = 32.0 / np.tan(np.radians(22.5))
  disc = lambda r: focal * r / np.sqrt(1.7**2 - r**2)
  yy, xx = np.mgrid[:64, :64] + 0.5 - 32.0
  dist = np.hypot(xx, yy)
  r = toy_world.SPHERE_RADIUS
  for view in opacity:
    assert np.all(view[dist < disc(r) - 0.5] > 0.5)
    assert np.all(view[dist > disc(r + 0.12) + 0.5] < 0.5)
    area = (view > 0.5).sum()
    assert np.pi * disc(r) ** 2 < area < np.pi * disc(r + 0.12) ** 2


@pytest.mark.parametrize("shape,volume", [
    ("sphere", 4 / 3 * np.pi * (toy_world.SPHERE_RADIUS + SURFACE_OFFSET) ** 3),
    # A cube of side a grown by d (Minkowski sum with a ball): a^3 + 6 a^2 d + 3 pi a d^2 + 4/3 pi d^3.
    ("cube", (lambda a, d: a**3 + 6 * a**2 * d + 3 * np.pi * a * d**2 + 4 / 3 * np.pi * d**3)(
        2 * toy_world.CUBE_HALF_EXTENT, SURFACE_OFFSET)),
    # A torus grown by d: a torus of minor radius r + d, volume 2 pi^2 R (r + d)^2.
    ("torus", 2 * np.pi**2 * toy_world.TORUS_MAJOR * (toy_world.TORUS_MINOR + SURFACE_OFFSET) ** 2),
])
def test_ground_truth_occupancy_has_the_closed_form_volume(shape, volume):
  occupied = toy_score.ground_truth(shape)["occupancy"]
  voxel = 2.0 * toy_score.GRID_BOUND / (toy_score.GRID_RESOLUTION - 1)
  assert occupied.sum() * voxel**3 == pytest.approx(volume, rel=0.03)


def _optical_depth_from_above(pixel_xy: np.ndarray) -> np.ndarray:
  """Independent reference: the torus density integrated along each pixel's ray of the
  top camera, by the trapezoid rule on a fine grid (no renderer involved)."""
  focal = 32.0 / np.tan(np.radians(22.5))
  d = np.stack([(pixel_xy[:, 0] - 32.0) / focal, -(pixel_xy[:, 1] - 32.0) / focal, -np.ones(len(pixel_xy))], -1)
  d /= np.linalg.norm(d, axis=-1, keepdims=True)
  t = np.linspace(0.7, 2.7, 20001)  # the unit sphere's chord around the centre
  x = np.array([0.0, 0.0, 1.7]) + t[None, :, None] * d[:, None, :]
  ring = np.hypot(x[..., 0], x[..., 1]) - toy_world.TORUS_MAJOR
  sdf = np.hypot(ring, x[..., 2]) - toy_world.TORUS_MINOR
  density = MAX_DENSITY / (1.0 + np.exp(sdf / SOFTNESS))
  return np.trapezoid(density, t, axis=-1)


def test_torus_hole_seen_from_above_matches_the_integrated_density():
  pixels = np.stack(np.meshgrid(np.arange(30, 34) + 0.5, np.arange(30, 34) + 0.5), -1).reshape(-1, 2)
  want = float(np.mean(1.0 - np.exp(-_optical_depth_from_above(pixels))))
  got = toy_score.centre_opacity(toy_score.ground_truth("torus")["top_opacity"])
  assert got == pytest.approx(want, abs=0.01)
  assert got < 0.1  # issue 19 quotes 0.07
  assert toy_score.centre_opacity(toy_score.ground_truth("sphere")["top_opacity"]) > 0.99


def _field(sdf_fn, color):
  color = jnp.asarray(color, jnp.float32)
  return lambda x: (MAX_DENSITY * jax.nn.sigmoid(-sdf_fn(x) / SOFTNESS), jnp.broadcast_to(color, x.shape))


def test_a_torus_without_its_hole_is_caught_from_above():
  # The lens of issue 14: the torus with its hole filled (the ring distance clamped at 0 inside the ring).
  def lens_sdf(x):
    ring = jnp.maximum(jnp.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2 + 1e-12) - toy_world.TORUS_MAJOR, 0.0)
    return jnp.sqrt(ring**2 + x[..., 2] ** 2 + 1e-12) - toy_world.TORUS_MINOR

  lens = toy_score.score_field(_field(lens_sdf, toy_world.COLORS["green"]), "a green torus", num_samples=32)
  torus = toy_score.score_field(_field(lambda x: toy_world.sdf_torus(x, toy_world.TORUS_MAJOR, toy_world.TORUS_MINOR),
                                       toy_world.COLORS["green"]), "a green torus", num_samples=32)
  assert lens["centre_opacity_above"] > 0.95 and not lens["has_hole"]
  assert torus["centre_opacity_above"] < 0.1 and torus["has_hole"]
  # Silhouettes barely see the difference, even at 75 degrees (the hole is small against the
  # ring: 0.98 there); the view from above and the volume do.
  assert min(lens["silhouette_iou_by_elevation"].values()) > 0.95, lens["silhouette_iou_by_elevation"]
  assert lens["volume_iou"] < torus["volume_iou"] - 0.1


def test_scores_name_the_shape_and_measure_the_colour():
  # The red of issue 14's over-saturated runs, on the world's sphere: distance from the true red
  # |(1, 0.05, 0.05) - (0.85, 0.12, 0.10)| = sqrt(0.0225 + 0.0049 + 0.0025).
  saturated = (1.0, 0.05, 0.05)
  sphere = _field(lambda x: toy_world.sdf_sphere(x, toy_world.SPHERE_RADIUS), saturated)
  right = toy_score.score_field(sphere, "a red sphere", num_samples=64)
  assert right["color"] == "red" and right["right_color"]
  assert right["color_distance"] == pytest.approx(np.sqrt(0.0299), abs=2e-3)
  np.testing.assert_allclose(right["mean_albedo"], saturated, atol=2e-3)
  assert right["best_volume_shape"] == "sphere"
  assert right["volume_margin"] > 0.1 and right["silhouette_margin"] > 0.1
  wrong = toy_score.score_field(sphere, "a blue cone", num_samples=64)
  assert wrong["volume_margin"] < -0.1 and wrong["silhouette_margin"] < -0.1
  assert wrong["color"] == "red" and not wrong["right_color"]
  assert wrong["volume_iou_by_shape"] == pytest.approx(right["volume_iou_by_shape"])  # the prompt picks, not changes


def test_bad_prompt_is_named():
  with pytest.raises(ValueError, match="a red dog"):
    toy_score.score_arrays("a red dog", opacity=None, rgb=None, top_opacity=None, occupied=None)


def test_orbit_cameras_match_the_silhouette_views():
  # The 15-degree ring is the side-view score of earlier versions (8 views, radius 1.7, fovy 45).
  ring = cameras.orbit_cameras(8, elevation_deg=15.0, radius=1.7, fovy_deg=45.0)
  np.testing.assert_allclose(toy_score.score_cameras().positions[8:16], ring.positions, atol=1e-6)


@pytest.mark.parametrize("yaw", [31.0, -40.0])  # 31 and 40 degrees off the axes
def test_a_turned_cube_is_a_cube_at_any_yaw_and_a_sphere_at_the_fixed_one(yaw):
  # A perfect cube turned about the vertical axis (rotated by hand here, not by
  # toy_score.yaw_field). The fixed-yaw volume IoU takes it for a sphere; the any-yaw
  # score finds the turn (modulo the cube's 90 degrees) and the cube.
  c, s = np.cos(np.radians(yaw)), np.sin(np.radians(yaw))

  def turned_sdf(x):  # the box's SDF at the point turned back by -yaw
    u = jnp.stack([c * x[..., 0] + s * x[..., 1], -s * x[..., 0] + c * x[..., 1], x[..., 2]], -1)
    return toy_world.sdf_box(u, toy_world.CUBE_HALF_EXTENT)

  score = toy_score.score_arrays("a red cube", **toy_score.observe_field(_field(turned_sdf, toy_world.COLORS["red"]),
                                                                         num_samples=32))
  assert score["volume_iou"] < 0.8 and score["best_volume_shape"] == "sphere", toy_score.summary_line(score)
  assert score["volume_iou_any_yaw"] > 0.98 and score["best_volume_shape_any_yaw"] == "cube"
  assert score["volume_margin_any_yaw"] > 0.2
  found = score["yaw_deg_by_shape"]["cube"]
  assert abs((found - yaw + 45.0) % 90.0 - 45.0) <= toy_score.YAW_STEP_DEG / 2
  # Solids of revolution have no yaw to find: their two scores are one.
  for shape in ("sphere", "cone", "torus"):
    assert score["volume_iou_any_yaw_by_shape"][shape] == score["volume_iou_by_shape"][shape]
    assert score["yaw_deg_by_shape"][shape] == 0.0


def test_the_untilted_cube_scores_the_same_at_any_yaw():
  occupied = toy_score.ground_truth("cube")["occupancy"]
  assert toy_score.any_yaw_iou(occupied, "cube") == (1.0, 0.0)
  sphere = toy_score.ground_truth("sphere")["occupancy"]
  # Against the sphere the cube's best yaw is any: the IoU does not move with it.
  assert toy_score.any_yaw_iou(sphere, "cube")[0] == pytest.approx(toy_score.mask_iou(sphere, occupied), abs=0.01)
