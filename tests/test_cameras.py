"""Cameras: closed-form checks of poses, rays, lights and view buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax import cameras


def test_spherical_to_cartesian_axes():
  p = cameras.spherical_to_cartesian(jnp.array([2.0, 2.0, 2.0]), jnp.array([0.0, 0.0, 90.0]),
                                     jnp.array([0.0, 90.0, 0.0]))
  np.testing.assert_allclose(p, [[2, 0, 0], [0, 2, 0], [0, 0, 2]], atol=1e-6)


def test_look_at_is_rotation_looking_at_target():
  key = jax.random.PRNGKey(0)
  eye = jax.random.normal(key, (16, 3)) * 3
  target = jax.random.normal(jax.random.PRNGKey(1), (16, 3)) * 0.2
  c2w = cameras.look_at(eye, target, jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), eye.shape))
  np.testing.assert_allclose(jnp.einsum("bji,bjk->bik", c2w, c2w), np.broadcast_to(np.eye(3), (16, 3, 3)), atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.det(c2w), np.ones(16), atol=1e-5)
  forward = (target - eye) / jnp.linalg.norm(target - eye, axis=-1, keepdims=True)
  np.testing.assert_allclose(-c2w[:, :, 2], forward, atol=1e-5)
  # Image "up" has a non-negative world z component: the horizon is level, not upside down.
  assert np.all(np.asarray(c2w[:, 2, 1]) >= 0)


@pytest.mark.parametrize("elevation,azimuth", [(0.0, 0.0), (30.0, 120.0), (-10.0, -75.0)])
def test_centre_ray_passes_through_look_at_target(elevation, azimuth):
  cams = cameras.orbit_cameras(1, elevation_deg=elevation, radius=2.5, fovy_deg=40.0, start_azimuth_deg=azimuth)
  origins, dirs = cameras.generate_rays(cams, 9, 7)  # odd: one pixel centre is the image centre
  o, d = origins[0, 4, 3], dirs[0, 4, 3]
  closest = o + jnp.dot(-o, d) * d  # closest point to the origin along the centre ray
  np.testing.assert_allclose(closest, np.zeros(3), atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(dirs, axis=-1), np.ones((1, 9, 7)), atol=1e-6)


def test_corner_rays_span_the_field_of_view():
  fovy = 60.0
  cams = cameras.orbit_cameras(1, fovy_deg=fovy)
  _, d = cameras.pixel_rays(cams, jnp.array([[[4.0, 0.0], [4.0, 8.0]]]), 8, 8)  # top and bottom edge, middle column
  angle = jnp.degrees(jnp.arccos(jnp.dot(d[0, 0], d[0, 1])))
  np.testing.assert_allclose(angle, fovy, rtol=1e-5)
  # The top edge ray points more upwards (+z) than the bottom one.
  assert d[0, 0, 2] > d[0, 1, 2]


def test_image_right_is_camera_right():
  """A camera at azimuth 0 (on +x, looking at -x) with +z up sees +y on the image's right."""
  cams = cameras.orbit_cameras(1, elevation_deg=0.0, start_azimuth_deg=0.0)
  _, d = cameras.pixel_rays(cams, jnp.array([[[0.0, 4.0], [8.0, 4.0]]]), 8, 8)
  assert d[0, 1, 1] > 0 > d[0, 0, 1]


def test_sample_cameras_ranges_and_stratification():
  b = 64
  cams = cameras.sample_cameras(jax.random.PRNGKey(3), b, radius_range=(1.0, 1.5), elevation_range_deg=(-10, 45),
                                azimuth_range_deg=(-180, 180), fovy_range_deg=(40, 70), camera_perturb=0.0,
                                center_perturb=0.0, up_perturb=0.0)
  assert np.all((cams.radius >= 1.0) & (cams.radius <= 1.5))
  assert np.all((cams.elevation_deg >= -10) & (cams.elevation_deg <= 45))
  assert np.all((cams.fovy_deg >= 40) & (cams.fovy_deg <= 70))
  # Without perturbation the camera sits exactly at its spherical coordinates.
  np.testing.assert_allclose(cams.positions, cameras.spherical_to_cartesian(cams.radius, cams.elevation_deg,
                                                                            cams.azimuth_deg), atol=1e-5)
  # Stratified: camera i's azimuth falls in the i-th slice of [-180, 180).
  slice_index = np.floor((np.asarray(cams.azimuth_deg) + 180.0) / (360.0 / b)).astype(int)
  np.testing.assert_array_equal(slice_index, np.arange(b))


def test_perturbations_move_cameras():
  kwargs = dict(radius_range=(1.0, 1.5), elevation_range_deg=(0, 30))
  plain = cameras.sample_cameras(jax.random.PRNGKey(5), 8, camera_perturb=0.0, center_perturb=0.0, up_perturb=0.0,
                                 **kwargs)
  jittered = cameras.sample_cameras(jax.random.PRNGKey(5), 8, camera_perturb=0.1, center_perturb=0.0,
                                    up_perturb=0.0, **kwargs)
  np.testing.assert_allclose(plain.azimuth_deg, jittered.azimuth_deg)
  assert float(jnp.max(jnp.abs(plain.positions - jittered.positions))) > 1e-3


def test_orbit_cameras_even_azimuths():
  cams = cameras.orbit_cameras(8, elevation_deg=20.0, radius=2.0)
  np.testing.assert_allclose(cameras.wrap_degrees(jnp.diff(cams.azimuth_deg)), np.full(7, 45.0), atol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(cams.positions, axis=-1), np.full(8, 2.0), rtol=1e-6)
  np.testing.assert_allclose(cams.positions[:, 2], np.full(8, 2.0 * np.sin(np.radians(20.0))), rtol=1e-5)


def test_lights_near_camera_direction():
  cams = cameras.orbit_cameras(4, elevation_deg=10.0)
  lights = cameras.sample_lights(jax.random.PRNGKey(0), cams, distance_range=(0.8, 1.5), position_perturb=0.0)
  dist = jnp.linalg.norm(lights, axis=-1)
  assert np.all((dist >= 0.8) & (dist <= 1.5))
  cos = jnp.sum(lights * cams.positions, axis=-1) / (dist * jnp.linalg.norm(cams.positions, axis=-1))
  np.testing.assert_allclose(cos, np.ones(4), atol=1e-5)


@pytest.mark.parametrize(
    "azimuth,elevation,expected",
    [(0.0, 0.0, "front"), (44.0, 10.0, "front"), (-44.0, 10.0, "front"), (46.0, 0.0, "side"),
     (-90.0, 0.0, "side"), (180.0, 0.0, "back"), (-150.0, 30.0, "back"), (140.0, 0.0, "back"),
     (0.0, 61.0, "overhead"), (180.0, 80.0, "overhead"), (90.0, 59.0, "side"), (360.0, 0.0, "front")],
)
def test_view_buckets(azimuth, elevation, expected):
  assert cameras.VIEW_BUCKETS[int(cameras.view_bucket(azimuth, elevation))] == expected


def test_view_bucket_thresholds_configurable():
  assert cameras.VIEW_BUCKETS[int(cameras.view_bucket(60.0, 0.0, front_threshold_deg=70.0))] == "front"
  assert cameras.VIEW_BUCKETS[int(cameras.view_bucket(0.0, 40.0, overhead_threshold_deg=30.0))] == "overhead"


def _assert_rotations(c2w):
  c2w = np.asarray(c2w, np.float64)
  assert np.all(np.isfinite(c2w))
  n = c2w.shape[0]
  np.testing.assert_allclose(np.einsum("bji,bjk->bik", c2w, c2w), np.broadcast_to(np.eye(3), (n, 3, 3)), atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(c2w), np.ones(n), atol=1e-5)


@pytest.mark.parametrize("elevation", [90.0, -90.0])
def test_camera_straight_above_or_below_has_the_limit_frame(elevation):
  """At +-90 degrees +z is parallel to the view: the frame is the limit of nearby elevations."""
  azimuths = np.array([0.0, 90.0, -135.0, 170.0])
  cams = [cameras.orbit_cameras(1, elevation_deg=elevation, radius=2.0, start_azimuth_deg=a) for a in azimuths]
  c2w = jnp.concatenate([c.c2w for c in cams])
  _assert_rotations(c2w)
  s, az = np.sign(elevation), np.deg2rad(azimuths)
  # Closed form of the limit el -> +-90 of the +z frame: right (-sin az, cos az, 0),
  # up -s (cos az, sin az, 0), backward s (0, 0, 1).
  np.testing.assert_allclose(c2w[:, :, 0], np.stack([-np.sin(az), np.cos(az), 0 * az], -1), atol=1e-5)
  np.testing.assert_allclose(c2w[:, :, 1], -s * np.stack([np.cos(az), np.sin(az), 0 * az], -1), atol=1e-5)
  np.testing.assert_allclose(c2w[:, :, 2], np.broadcast_to([0.0, 0.0, s], (4, 3)), atol=1e-5)
  near = jnp.concatenate([cameras.orbit_cameras(1, elevation_deg=elevation - s * 0.05, radius=2.0,
                                                 start_azimuth_deg=a).c2w for a in azimuths])
  np.testing.assert_allclose(c2w, near, atol=2e-3)  # continuous: 0.05 degrees is ~1e-3 rad


def test_look_at_parallel_up_falls_back_to_a_world_axis():
  eye = jnp.array([[0.0, 0.0, 2.0], [0.0, 0.0, -3.0]])
  c2w = cameras.look_at(eye, jnp.zeros_like(eye), jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), eye.shape))
  _assert_rotations(c2w)
  np.testing.assert_allclose(-c2w[:, :, 2], [[0, 0, -1], [0, 0, 1]], atol=1e-6)  # still looks at the target


def test_sampled_cameras_at_90_degrees_are_rotations():
  cams = cameras.sample_cameras(jax.random.PRNGKey(0), 8, elevation_range_deg=(90.0, 90.0), camera_perturb=0.0,
                                center_perturb=0.0, up_perturb=0.0)
  _assert_rotations(cams.c2w)
  np.testing.assert_allclose(cams.c2w[:, :, 2], np.broadcast_to([0.0, 0.0, 1.0], (8, 3)), atol=1e-5)
