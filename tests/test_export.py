"""Mesh export of analytic fields (closed-form surfaces) and turntable videos of a run."""

import copy
import math
import os
import subprocess
import sys

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from configs import dreamfusion
from dreamfusion_jax import cameras, export, render, state as state_lib, train
from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax.checkpoints import Checkpointer

# ffmpeg and the CLI tests start subprocesses (fork + exec) from a process running JAX.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 1.0
RESOLUTION = 40
VOXEL = 2 * BOUND / (RESOLUTION - 1)


def colour_of(x):
  """A colour that varies along every axis, so a vertex given another's colour shows."""
  return jnp.stack([(x[..., 0] + 1) / 2, (x[..., 1] + 1) / 2, 0.25 + 0.5 * jnp.abs(x[..., 2])], axis=-1)


def ball(radius, centre=(0.0, 0.0, 0.0), density=100.0):
  c = jnp.asarray(centre)
  return lambda x: jnp.where(jnp.linalg.norm(x - c, axis=-1) < radius, density, 0.0)


def field(*densities):
  return lambda x: (sum(d(x) for d in densities), colour_of(x))


SPHERE_RADIUS = 0.6
sphere_field = field(ball(SPHERE_RADIUS))


@pytest.fixture(scope="module")
def sphere_mesh():
  return export.extract_mesh(sphere_field, resolution=RESOLUTION, bound=BOUND, threshold=50.0)


def test_sphere_is_closed_at_its_radius_with_the_field_colours(sphere_mesh):
  mesh = sphere_mesh
  assert mesh.is_watertight and mesh.euler_number == 2  # one closed genus-0 surface
  assert mesh.volume > 0  # faces point outwards
  radii = np.linalg.norm(mesh.vertices, axis=-1)
  np.testing.assert_allclose(radii, SPHERE_RADIUS, atol=VOXEL)
  expected = np.asarray(colour_of(jnp.asarray(mesh.vertices, jnp.float32)))
  np.testing.assert_allclose(mesh.visual.vertex_colors[:, :3] / 255.0, expected, atol=0.6 / 255)
  assert np.ptp(mesh.visual.vertex_colors[:, 0]) > 100  # the colours do vary


def test_box_has_the_right_bounding_box():
  lo, hi = np.array([-0.5, -0.2, -0.6]), np.array([0.3, 0.55, 0.1])
  box = lambda x: jnp.where(jnp.all((x > lo) & (x < hi), axis=-1), 100.0, 0.0)
  mesh = export.extract_mesh(field(box), resolution=RESOLUTION, bound=BOUND, threshold=50.0, colour=False)
  assert mesh.is_watertight
  np.testing.assert_allclose(mesh.bounds, np.stack([lo, hi]), atol=VOXEL)


def test_dense_everywhere_closes_at_the_bounding_sphere():
  """Density outside the sphere counts as zero (as in rendering) and the grid is padded,
  so a field dense up to the cube's faces still gives a closed surface. (An odd
  resolution puts grid points on the face centres, exactly at the sphere.)"""
  mesh = export.extract_mesh(field(lambda x: jnp.full(x.shape[:-1], 100.0)), resolution=RESOLUTION + 1,
                             bound=BOUND, threshold=50.0, colour=False)
  assert mesh.is_watertight
  np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=-1), BOUND, atol=VOXEL)


@pytest.mark.parametrize("fraction, num_components", [(0.05, 1), (0.0, 2)])
def test_small_floaters_are_removed(fraction, num_components):
  two = field(ball(0.5), ball(0.09, centre=(0.0, 0.0, 0.75)))
  mesh = export.extract_mesh(two, resolution=RESOLUTION, bound=BOUND, threshold=50.0,
                             min_component_fraction=fraction, colour=False)
  assert len(mesh.split(only_watertight=False)) == num_components
  if num_components == 1:
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=-1), 0.5, atol=VOXEL)


@pytest.mark.parametrize("fmt", ["glb", "ply", "obj"])
def test_mesh_file_reloads_with_the_same_vertices_and_colours(sphere_mesh, tmp_path, fmt):
  path = str(tmp_path / f"sphere.{fmt}")
  assert export.save_mesh(sphere_mesh, path) == [path]
  loaded = trimesh.load(path, process=False)
  if isinstance(loaded, trimesh.Scene):
    (loaded,) = loaded.geometry.values()
  assert len(loaded.vertices) == len(sphere_mesh.vertices)
  np.testing.assert_allclose(loaded.vertices, sphere_mesh.vertices, atol=1e-5)
  # GLB: with a (matte) material, trimesh keeps COLOR_0 as a vertex attribute.
  colours = (loaded.visual.vertex_attributes["color"] if fmt == "glb" else loaded.visual.vertex_colors)
  np.testing.assert_array_equal(np.asarray(colours)[:, :3], sphere_mesh.visual.vertex_colors[:, :3])
  assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not left private by mkstemp


@pytest.mark.parametrize("fmt", ["obj", "glb"])
def test_texture_holds_the_albedo(tmp_path, fmt):
  path = str(tmp_path / f"textured.{fmt}")
  _, paths = export.export_mesh(sphere_field, path, resolution=24, bound=BOUND, threshold=50.0, texture=True,
                                texture_size=256)
  if fmt == "obj":
    assert sorted(os.path.basename(p) for p in paths) == ["textured.mtl", "textured.obj", "textured.png"]
  loaded = trimesh.load(path, force="mesh")
  image = getattr(loaded.visual.material, "baseColorTexture", None) or loaded.visual.material.image
  # Colour looked up in the texture at each face's centre vs the field at that point.
  uv = loaded.visual.uv[loaded.faces].mean(axis=1)
  looked_up = trimesh.visual.color.uv_to_color(uv, image)[:, :3] / 255.0
  expected = np.asarray(colour_of(jnp.asarray(loaded.triangles_center, jnp.float32)))
  error = np.abs(looked_up - expected)
  assert error.mean() < 0.01 and error.max() < 0.05


def test_empty_field_raises_and_keeps_the_old_file(tmp_path):
  path = tmp_path / "mesh.glb"
  path.write_bytes(b"a good mesh")
  with pytest.raises(ValueError, match=r"threshold 50 .*maximum density found is 3.*lower --threshold"):
    export.export_mesh(field(ball(0.5, density=3.0)), str(path), resolution=16, bound=BOUND, threshold=50.0)
  assert path.read_bytes() == b"a good mesh"
  assert os.listdir(tmp_path) == ["mesh.glb"]


def test_failed_write_leaves_the_old_file(sphere_mesh, tmp_path, monkeypatch):
  path = tmp_path / "sphere.glb"
  path.write_bytes(b"a good mesh")

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(trimesh.exchange.gltf, "export_glb", broken)
  with pytest.raises(OSError):
    export.save_mesh(sphere_mesh, str(path))
  assert path.read_bytes() == b"a good mesh"
  assert os.listdir(tmp_path) == ["sphere.glb"]


def test_default_threshold_makes_one_render_step_half_opaque():
  num_samples, bound = 64, 1.0
  threshold = export.default_threshold(bound=bound, num_samples=num_samples)
  assert threshold == pytest.approx(22.18, abs=0.01)
  step = 2 * bound / num_samples
  opacity = jnp.sum(render.compositing_weights(jnp.array([threshold]), jnp.array([step])))
  assert float(opacity) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("path, fmt, texture", [("m.ply", None, True), ("m.glb", "obj", False), ("m.stl", None, False)])
def test_bad_export_arguments_fail_before_any_work(path, fmt, texture):
  with pytest.raises(ValueError):
    export.check_export_args(path, format=fmt, texture=texture)


# ---------------------------------------------------------------------------------
# A run directory: the tiny config's randomly initialised scene, checkpointed.

NUM_FRAMES, SIZE = 6, 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = dreamfusion.get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("run"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  scene = scene_lib.build_scene(config)
  tx = state_lib.make_optimizer(config.optim, config.train.steps)
  state = state_lib.create_train_state(scene, tx, jax.random.PRNGKey(3))
  state = state.replace(step=jnp.asarray(3, jnp.int32))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
  checkpointer.save(3, state)
  checkpointer.wait()
  checkpointer.close()
  return config, scene, state.params, workdir


def _cli(script, *args):
  result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_scene_density_grid_is_the_field_on_the_grid(run):
  _, scene, params, _ = run
  fn = export.scene_field_fn(scene, params)
  grid = export.density_grid(fn, resolution=12, bound=BOUND, chunk_size=500)  # 1728 points: 4 chunks, padded
  x = export.grid_positions(12, BOUND)
  points = np.stack(np.meshgrid(x, x, x, indexing="ij"), axis=-1)
  density, _ = scene.field_fn(params)(jnp.asarray(points))
  expected = np.where(np.linalg.norm(points, axis=-1) <= BOUND, np.asarray(density), 0.0)
  np.testing.assert_allclose(grid, expected, rtol=1e-5, atol=1e-5)
  assert grid.max() > 0 and np.ptp(grid[grid > 0]) > 0


def test_export_cli_writes_the_same_mesh_as_extract_mesh(run, tmp_path):
  # A consistency check of the CLI against the library (extract_mesh itself is checked against
  # closed forms above: sphere radius, box bounds, the bounding sphere).
  _, scene, params, workdir = run
  grid = export.density_grid(export.scene_field_fn(scene, params), resolution=24, bound=BOUND)
  threshold = 0.5 * float(grid.max())
  out = str(tmp_path / "run.ply")
  stdout = _cli("export.py", f"--workdir={workdir}", "--resolution=24", f"--threshold={threshold}", f"--out={out}")
  assert f"wrote {out}" in stdout
  mesh = trimesh.load(out)
  expected = export.extract_mesh(export.scene_field_fn(scene, params), resolution=24, bound=BOUND,
                                 threshold=threshold)
  assert len(mesh.vertices) == len(expected.vertices) > 0
  np.testing.assert_allclose(np.sort(mesh.vertices, axis=0), np.sort(expected.vertices, axis=0), atol=1e-5)


def test_run_export_with_too_high_threshold_names_it(run):
  workdir = run[3]
  with pytest.raises(ValueError, match="no density above the threshold 1e\\+06"):
    export.export_run_mesh(workdir, resolution=8, threshold=1e6)
  assert not os.path.exists(os.path.join(workdir, "export", "mesh_000003.glb"))


def test_video_cli_frames_match_a_direct_render(run, tmp_path):
  config, scene, params, workdir = run
  out_dir = str(tmp_path / "video")
  _cli("render_video.py", f"--workdir={workdir}", f"--frames={NUM_FRAMES}", f"--height={SIZE}", f"--width={SIZE}",
       "--batch_size=4", "--save_frames", f"--out_dir={out_dir}")
  width = len(export.VIDEO_LAYERS) * SIZE
  png = np.stack([iio.imread(os.path.join(out_dir, "turntable_frames", f"{i:04d}.png")) for i in range(NUM_FRAMES)])
  gif = iio.imread(os.path.join(out_dir, "turntable.gif"))[..., :3]
  with imageio_v2.get_reader(os.path.join(out_dir, "turntable.mp4"), format="FFMPEG") as reader:
    mp4 = np.stack([frame for frame in reader])  # not list(reader): its len() is inf
  for frames in (png, gif, mp4):
    assert frames.shape == (NUM_FRAMES, SIZE, width, 3)

  c = config.cameras
  cams = cameras.orbit_cameras(NUM_FRAMES, elevation_deg=c.eval_elevation_deg, radius=c.eval_radius,
                               fovy_deg=c.eval_fovy_deg)
  direct = export.turntable_frames(jax.device_get(
      scene_lib.render_eval_views(scene, params, cams, height=SIZE, width=SIZE)))
  # PNG frames are exact up to one uint8 step (batching changes float rounding).
  np.testing.assert_allclose(png.astype(int), direct.astype(int), atol=1)
  assert np.abs(png[0].astype(int) - direct[NUM_FRAMES // 2]).max() > 20  # the camera does turn
  # GIF: a 256-colour palette; MP4: lossy H.264 at a tiny size.
  assert np.abs(gif.astype(int) - direct).mean() < 4
  assert np.abs(mp4.astype(int) - direct).mean() < 6


def test_render_turntable_rejects_bad_layers_before_rendering(run, tmp_path):
  config, scene, params, _ = run
  with pytest.raises(ValueError, match="layers"):
    export.render_turntable(config, scene, params, str(tmp_path), num_frames=2, layers=("rgb", "albedo"))
  assert os.listdir(tmp_path) == []


def test_end_of_training_mesh_is_extract_mesh_at_the_runs_threshold(run, tmp_path):
  config, scene, params, _ = run
  config = copy.deepcopy(config)
  # The tiny config's blob peaks near density 5, under its threshold ln 2 * 16 / 2: empty.
  with pytest.raises(ValueError, match="no density above the threshold"):
    export.export_scene_mesh(config, scene, params, str(tmp_path / "empty.glb"), step=3, resolution=16)
  assert not os.path.exists(tmp_path / "empty.glb")
  config.render.num_samples = 4  # threshold ln 2 * 4 / 2 = 1.39: the blob's core is inside
  out = str(tmp_path / "mesh.glb")
  _, paths, threshold = export.export_scene_mesh(config, scene, params, out, step=3, resolution=16)
  assert paths == [out]
  assert threshold == pytest.approx(2 * math.log(2.0))
  expected = export.extract_mesh(export.scene_field_fn(scene, params, scene.level_mask(3)), resolution=16,
                                 bound=BOUND, threshold=2 * math.log(2.0))
  mesh = trimesh.load(out, force="mesh")
  assert len(mesh.vertices) == len(expected.vertices) > 0
  np.testing.assert_allclose(np.sort(mesh.vertices, axis=0), np.sort(expected.vertices, axis=0), atol=1e-5)
