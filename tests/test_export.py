"""Mesh export of analytic fields (closed-form surfaces) and turntable videos of a run."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from configs import dreamfusion
from dreamfusion_jax import cameras, export, render, state as state_lib, toy_world, video
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


def y_up(points):
  """World (x, y, z), +z up and front +x, in glTF's frame (+Y up, front +Z): (y, z, x)."""
  return np.asarray(points)[..., [1, 2, 0]]


def world(points):
  """The inverse of `y_up`."""
  return np.asarray(points)[..., [2, 0, 1]]


def load_mesh(path):
  """A mesh file as one Trimesh, with a glTF scene's node transforms applied."""
  loaded = trimesh.load(path, process=False)
  return loaded.to_geometry() if isinstance(loaded, trimesh.Scene) else loaded


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
  loaded = load_mesh(path)
  assert len(loaded.vertices) == len(sphere_mesh.vertices)
  # GLB and OBJ are +Y up, PLY keeps the world's +z up.
  expected = sphere_mesh.vertices if fmt == "ply" else y_up(sphere_mesh.vertices)
  np.testing.assert_allclose(loaded.vertices, expected, atol=1e-5)
  # GLB: with a (matte) material, trimesh keeps COLOR_0 as a vertex attribute (of the
  # scene's geometry: `to_geometry` drops it).
  if fmt == "glb":
    (geometry,) = trimesh.load(path, process=False).geometry.values()
    colours = geometry.visual.vertex_attributes["color"]
  else:
    colours = loaded.visual.vertex_colors
  np.testing.assert_array_equal(np.asarray(colours)[:, :3], sphere_mesh.visual.vertex_colors[:, :3])
  assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not left private by mkstemp


@pytest.mark.parametrize("fmt", ["obj", "glb"])
def test_texture_holds_the_albedo(tmp_path, fmt):
  path = str(tmp_path / f"textured.{fmt}")
  # A texture is the default for GLB and OBJ.
  _, paths = export.export_mesh(sphere_field, path, resolution=24, bound=BOUND, threshold=50.0, texture_size=256)
  if fmt == "obj":
    assert sorted(os.path.basename(p) for p in paths) == ["textured.mtl", "textured.obj", "textured.png"]
  loaded = load_mesh(path)
  image = getattr(loaded.visual.material, "baseColorTexture", None) or loaded.visual.material.image
  # Colour looked up in the texture at each face's centre vs the field at that point.
  uv = loaded.visual.uv[loaded.faces].mean(axis=1)
  looked_up = trimesh.visual.color.uv_to_color(uv, image)[:, :3] / 255.0
  expected = np.asarray(colour_of(jnp.asarray(world(loaded.triangles_center), jnp.float32)))
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


@pytest.mark.parametrize("path, fmt, texture, match", [
    ("m.ply", None, True, "PLY has no textures"),
    ("m.glb", "obj", False, "does not end in .obj"),
    ("m.stl", None, False, "one of glb, obj, ply, got 'stl' .the extension"),
    ("m.stl", "stl", False, "one of glb, obj, ply, got 'stl'$"),
])
def test_bad_export_arguments_fail_before_any_work(path, fmt, texture, match):
  with pytest.raises(export.ExportError, match=match):
    export.check_export_args(path, format=fmt, texture=texture)


def test_texture_is_the_default_where_the_format_has_one():
  assert export.check_export_args("m.glb") == ("glb", True)
  assert export.check_export_args("m.obj") == ("obj", True)
  assert export.check_export_args("m.ply") == ("ply", False)
  assert export.check_export_args("m.glb", texture=False) == ("glb", False)  # vertex colours on request


# ---------------------------------------------------------------------------------
# Upright files: glTF (and OBJ by the common convention) are +Y up with the front at +Z.

CONE_H, CONE_R = toy_world.CONE_HALF_HEIGHT, toy_world.CONE_RADIUS
cone_field = field(lambda x: jnp.where(toy_world.sdf_cone(x, CONE_H, CONE_R) < 0, 100.0, 0.0))


@pytest.fixture(scope="module")
def cone_mesh():
  """toy_world's cone, tip at world +z (0, 0, h), base disc of radius r at z = -h."""
  return export.extract_mesh(cone_field, resolution=RESOLUTION, bound=BOUND, threshold=50.0)


@pytest.mark.parametrize("fmt, up", [("glb", 1), ("obj", 1), ("ply", 2)])
def test_cone_stands_upright_in_the_files_convention(cone_mesh, tmp_path, fmt, up):
  path = str(tmp_path / f"cone.{fmt}")
  export.save_mesh(cone_mesh, path)
  loaded = load_mesh(path)
  tip = loaded.vertices[np.argmax(loaded.vertices[:, up])]
  expected_tip = np.zeros(3)
  expected_tip[up] = CONE_H
  np.testing.assert_allclose(tip, expected_tip, atol=2 * VOXEL)
  # The base: the lowest vertices span the full disc across the two other axes.
  lo, hi = loaded.bounds
  assert lo[up] == pytest.approx(-CONE_H, abs=VOXEL)
  across = [a for a in range(3) if a != up]
  np.testing.assert_allclose(hi[across], CONE_R, atol=VOXEL)
  np.testing.assert_allclose(lo[across], -CONE_R, atol=VOXEL)
  base = loaded.vertices[loaded.vertices[:, up] < -CONE_H + VOXEL]
  assert np.linalg.norm(base[:, across], axis=-1).max() == pytest.approx(CONE_R, abs=VOXEL)


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_front_faces_plus_z_and_handedness_is_kept(tmp_path, fmt):
  """A tetrahedron with corners on world +x (front, azimuth 0), +y (left of that view),
  +z (up) and the origin: in glTF's frame they must land on +Z, +X, +Y, and the mesh
  must keep a positive volume (a reflection would turn it inside out)."""
  corners = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
  tetra = trimesh.Trimesh(corners, [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], process=False)
  assert tetra.volume == pytest.approx(1 / 6)  # outward faces in the world frame
  path = str(tmp_path / f"tetra.{fmt}")
  export.save_mesh(tetra, path)
  loaded = load_mesh(path)
  expected = np.array([[0.0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]])  # origin, front, left, up
  np.testing.assert_allclose(loaded.vertices, expected, atol=1e-6)
  assert loaded.volume == pytest.approx(1 / 6)


def test_decimation_meets_the_budget_and_keeps_the_sphere():
  full = export.extract_mesh(sphere_field, resolution=RESOLUTION, bound=BOUND, threshold=50.0, colour=False)
  target = 500
  assert len(full.faces) > 8 * target
  mesh = export.extract_mesh(sphere_field, resolution=RESOLUTION, bound=BOUND, threshold=50.0,
                             target_faces=target)
  assert 0.8 * target <= len(mesh.faces) <= target
  assert mesh.is_watertight and mesh.euler_number == 2
  assert mesh.volume == pytest.approx(4 / 3 * math.pi * SPHERE_RADIUS**3, rel=0.03)
  np.testing.assert_allclose(mesh.bounds, [[-SPHERE_RADIUS] * 3, [SPHERE_RADIUS] * 3], atol=VOXEL)
  np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=-1), SPHERE_RADIUS, atol=VOXEL)
  # Colours come after decimation, from the field at the new vertices.
  expected = np.asarray(colour_of(jnp.asarray(mesh.vertices, jnp.float32)))
  np.testing.assert_allclose(mesh.visual.vertex_colors[:, :3] / 255.0, expected, atol=0.6 / 255)


def test_no_decimation_at_zero_or_within_budget(sphere_mesh):
  assert export.decimate(sphere_mesh, 0) is sphere_mesh
  assert export.decimate(sphere_mesh, len(sphere_mesh.faces)) is sphere_mesh
  with pytest.raises(export.ExportError, match="target_faces must be >= 0"):
    export.decimate(sphere_mesh, -1)


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


def _tree(directory):
  """Every path under `directory` with its size and modification time."""
  return sorted((os.path.relpath(os.path.join(root, name), directory), os.stat(os.path.join(root, name)).st_size,
                 os.stat(os.path.join(root, name)).st_mtime_ns)
                for root, dirs, names in os.walk(directory) for name in dirs + names)


# Runs scripts/export.py's main() on several command lines in one process (one JAX
# start-up instead of one per case): flags are re-parsed for each, and the message that
# sys.exit would print (its code) is returned.
_CLI_DRIVER = """
import json, runpy, sys
from absl import flags
script = runpy.run_path("scripts/export.py")
results = []
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["export.py"] + argv)
  try:
    script["main"](["export.py"])
    results.append(None)
  except SystemExit as e:
    results.append(e.code)
print(json.dumps(results))
"""


def test_export_cli_bad_inputs_give_one_line_and_change_nothing(run, tmp_path):
  workdir = run[3]
  empty, config_only = tmp_path / "empty", tmp_path / "config_only"
  empty.mkdir()
  config_only.mkdir()
  (config_only / "config.json").write_bytes((Path(workdir) / "config.json").read_bytes())
  missing = tmp_path / "missing"
  cases = [  # (arguments, what the one line must say)
      ([f"--workdir={missing}"], f"--workdir '{missing}' does not exist"),
      ([f"--workdir={workdir}/config.json"], f"--workdir '{workdir}/config.json' is not a directory"),
      ([f"--workdir={empty}"], f"--workdir '{empty}' has no config.json"),
      ([f"--workdir={config_only}"], f"--workdir '{config_only}' has no checkpoint in"),
      ([f"--workdir={workdir}", "--step=99"], "no checkpoint for --step=99 in"),
      ([f"--workdir={workdir}", "--format=stl"], "mesh format must be one of glb, obj, ply, got 'stl'"),
      ([f"--workdir={workdir}", "--out=/proc/forbidden/mesh.glb"], "cannot write '/proc/forbidden/mesh.glb'"),
      ([f"--workdir={workdir}", f"--out={workdir}/config.json/mesh.glb"], "config.json' is a file, not a directory"),
      ([f"--workdir={workdir}", "--target_faces=-5"], "target_faces must be >= 0"),
  ]
  before = _tree(workdir)
  result = subprocess.run([sys.executable, "-c", _CLI_DRIVER, json.dumps([args for args, _ in cases])], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  messages = json.loads(result.stdout.strip().splitlines()[-1])
  for (args, expected), message in zip(cases, messages):
    assert isinstance(message, str), (args, message)  # sys.exit(str): exit status 1
    assert message.startswith("error: ") and expected in message and "\n" not in message, (args, message)
  assert _tree(workdir) == before
  assert not missing.exists() and os.listdir(empty) == [] and os.listdir(config_only) == ["config.json"]


def test_export_cli_on_an_empty_workdir_prints_one_line(tmp_path):
  """The real process, as the issue saw it: exit status 1 and one line on stderr."""
  result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "export.py"), f"--workdir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip() == (f"error: --workdir '{tmp_path}' has no config.json: is it the --workdir of a "
                                   "training run?")
  assert result.stdout == "" and os.listdir(tmp_path) == []


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
  width = len(video.VIDEO_LAYERS) * SIZE
  png = np.stack([iio.imread(os.path.join(out_dir, "turntable_frames", f"{i:04d}.png")) for i in range(NUM_FRAMES)])
  gif = iio.imread(os.path.join(out_dir, "turntable.gif"))[..., :3]
  with imageio_v2.get_reader(os.path.join(out_dir, "turntable.mp4"), format="FFMPEG") as reader:
    mp4 = np.stack([frame for frame in reader])  # not list(reader): its len() is inf
  for frames in (png, gif, mp4):
    assert frames.shape == (NUM_FRAMES, SIZE, width, 3)

  c = config.cameras
  cams = cameras.orbit_cameras(NUM_FRAMES, elevation_deg=c.eval_elevation_deg, radius=c.eval_radius,
                               fovy_deg=c.eval_fovy_deg)
  direct = video.turntable_frames(jax.device_get(
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
    video.render_turntable(config, scene, params, str(tmp_path), num_frames=2, layers=("rgb", "albedo"))
  assert os.listdir(tmp_path) == []


def test_end_of_training_mesh_is_extract_mesh_at_the_runs_threshold(run, tmp_path):
  config, scene, params, _ = run
  config = copy.deepcopy(config)
  # The tiny config's blob (Magic3D's, strength 10) peaks near density 10, under the
  # threshold ln 2 * 32 / 2 = 11.1 of 32 samples per ray: empty.
  config.render.num_samples = 32
  with pytest.raises(ValueError, match="no density above the threshold"):
    export.export_scene_mesh(config, scene, params, str(tmp_path / "empty.glb"), step=3, resolution=16)
  assert not os.path.exists(tmp_path / "empty.glb")
  config.render.num_samples = 4  # threshold ln 2 * 4 / 2 = 1.39: the blob's core is inside
  out = str(tmp_path / "mesh.glb")
  _, paths, threshold = export.export_scene_mesh(config, scene, params, out, step=3, resolution=16, texture=False)
  assert paths == [out]
  assert threshold == pytest.approx(2 * math.log(2.0))
  expected = export.extract_mesh(export.scene_field_fn(scene, params, scene.level_mask(3)), resolution=16,
                                 bound=BOUND, threshold=2 * math.log(2.0))
  mesh = load_mesh(out)
  assert len(mesh.vertices) == len(expected.vertices) > 0
  np.testing.assert_allclose(np.sort(world(mesh.vertices), axis=0), np.sort(expected.vertices, axis=0), atol=1e-5)
