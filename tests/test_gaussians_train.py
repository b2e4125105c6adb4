"""The Gaussian representation through the shared train step, loop, checkpoints and
export: a few steps on the embedded toy prior, bit-exact resume, several devices
against one, and the density field the mesh export reads."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy_gaussians
from dreamfusion_jax import cameras, export, runs, toy_prior, toy_score, train
from dreamfusion_jax.gaussians import pool as pool_lib
from dreamfusion_jax.gaussians import rasterize
from dreamfusion_jax.gaussians import scene as gaussian_scene

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  config = toy_gaussians.get_config("tiny")
  config.prompt = "a blue sphere"
  return config


@pytest.fixture(scope="module")
def prior():
  return toy_prior.load()


def moments_of(opt_state, capacity):
  """Every opt-state array under a "gaussians" key with `capacity` rows (Adam's mu, nu)."""
  found = []

  def visit(path, x):
    if any(getattr(k, "key", None) == "gaussians" for k in path) and np.ndim(x) >= 1 and x.shape[0] == capacity:
      found.append(np.asarray(x))

  jax.tree_util.tree_map_with_path(visit, opt_state)
  return found


def test_train_steps_densify_with_static_shapes(prior):
  """Six steps of the shared train step: the loss is finite, parameters move, the
  pool densifies in place (same shapes, more active slots), and every slot that
  densification wrote (new ones and split originals) starts with zero Adam moments."""
  config = tiny_config()
  run = runs.setup_run(config, guidance_and_params=prior)
  assert isinstance(run.scene, gaussian_scene.GaussianScene)
  settings = train.StepSettings.from_config(config, num_devices=1)
  step = jax.jit(functools.partial(train.train_step, scene=run.scene, guidance=run.guidance, method=run.method,
                                   settings=settings, tx=run.tx, axis_name=None))
  shapes = jax.tree_util.tree_map(jnp.shape, run.state)
  state, capacity = run.state, config.gaussians.capacity
  grew = False
  for _ in range(config.train.steps):
    before = np.asarray(state.params["field"]["pool"]["active"]) > 0.5
    previous = state
    state, metrics = step(state, run.guidance_params, run.embeddings, run.base_key)
    assert jax.tree_util.tree_map(jnp.shape, state) == shapes
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0
    after = np.asarray(state.params["field"]["pool"]["active"]) > 0.5
    assert float(metrics["num_active"]) == before.sum()  # rendered with the pool before upkeep
    # Split originals are rewritten in place with scales / 1.6: a change in log scale of
    # 0.47, where one Adam step moves it by about its learning rate (5e-3).
    log_scale_change = np.abs(np.asarray(state.params["field"]["gaussians"]["log_scales"])
                              - np.asarray(previous.params["field"]["gaussians"]["log_scales"])).max(-1)
    written = (after & ~before) | (before & (log_scale_change > 0.1))
    if (before & (log_scale_change > 0.1)).any():
      grew = True
      moments = moments_of(state.opt_state, capacity)
      assert len(moments) >= 10  # mu and nu of the five parameters
      assert any(m[before & ~written].any() for m in moments)  # the others keep theirs
      for m in moments:
        assert not m[written].any()
    assert after.sum() == before.sum() + metrics["num_cloned"] + metrics["num_split"] - metrics["num_pruned"]
  assert grew
  moved = np.abs(np.asarray(state.params["field"]["gaussians"]["color_logits"])
                 - np.asarray(run.state.params["field"]["gaussians"]["color_logits"]))[:config.gaussians.num_points]
  assert moved.max() > 1e-3


@pytest.mark.slow
def test_resume_is_bit_exact(prior, tmp_path):
  """3 steps, stop, resume to 6 equals 6 uninterrupted steps, pool bookkeeping and
  Adam state included (the densify at step 4 and 6 depends on both)."""
  config = tiny_config()
  train.train_and_evaluate(config, str(tmp_path / "full"))
  # Stopped after 3 of the 6 steps: the schedules that follow train.steps (densify window,
  # means decay, opacity reset, t annealing; sweep.follow_steps) stay the 6-step run's,
  # resolved first.
  first = tiny_config().copy_and_resolve_references()
  first.train.steps = 3
  assert first.gaussians.densify_until == config.gaussians.densify_until == 6
  train.train_and_evaluate(first, str(tmp_path / "resumed"))
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  _, _, full, step_full = runs.restore_scene(str(tmp_path / "full"))
  _, scene, resumed, step_resumed = runs.restore_scene(str(tmp_path / "resumed"))
  assert step_full == step_resumed == 6
  assert isinstance(scene, gaussian_scene.GaussianScene)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)
  assert (np.asarray(full["field"]["pool"]["active"]) > 0.5).sum() > config.gaussians.num_points
  assert os.path.exists(tmp_path / "full" / "renders" / "step_000006.png")


DEVICE_CHECK = textwrap.dedent("""
    import jax, numpy as np
    from configs import toy_gaussians
    from dreamfusion_jax import runs, toy_prior, train

    assert jax.local_device_count() == 2, jax.devices()
    config = toy_gaussians.get_config("tiny")
    config.gaussians.capacity = 2048  # room for every densification: the active sets can differ
    parts = runs.setup_run(config, guidance_and_params=toy_prior.load())

    def run(num_devices, batch_size, steps=4):
      config.train.batch_size = batch_size
      devices = jax.local_devices()[:num_devices]
      settings = train.StepSettings.from_config(config, num_devices=num_devices)
      p_step = train.make_pmapped_step(parts.scene, parts.guidance, parts.method, settings, parts.tx, devices=devices)
      s = train.replicate(parts.state, devices)
      args = [train.replicate(x, devices) for x in (parts.guidance_params, parts.embeddings, parts.base_key)]
      for _ in range(steps):
        s, metrics = p_step(s, *args)
      return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], (s, metrics)))

    (s2, m2), (s1, m1) = run(2, 1), run(1, 2)
    active2, active1 = (s.params["field"]["pool"]["active"] > 0.5 for s in (s2, s1))
    print("active", active2.sum(), active1.sum(), "initial", config.gaussians.num_points)
    assert active1.sum() > config.gaussians.num_points
    np.testing.assert_array_equal(active2, active1)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-4)
    for a, b in zip(*(jax.tree_util.tree_leaves(s.params) for s in (s2, s1))):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    print("EQUIVALENT")
""")


@pytest.mark.slow
def test_two_devices_match_one_device_with_twice_the_batch():
  """Densification statistics are summed over devices: 2 devices x batch 1 densify
  exactly the slots that 1 device x batch 2 does, and reach the same parameters."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run([sys.executable, "-c", DEVICE_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert "EQUIVALENT" in result.stdout, result.stdout + result.stderr


def ball_scene(num=400, radius=0.3, scale=0.04, capacity=512):
  """`num` isotropic Gaussians on a jittered grid filling a ball of `radius`."""
  config = tiny_config()
  config.gaussians.capacity = capacity
  scene = gaussian_scene.build_scene(config)
  params = scene.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  points = rng.uniform(-radius, radius, (20 * num, 3))
  points = points[np.linalg.norm(points, axis=-1) < radius][:num]
  g = dict(params["field"]["gaussians"])
  g["means"] = g["means"].at[:num].set(points)
  g["log_scales"] = jnp.full_like(g["log_scales"], np.log(scale))
  g["opacity_logits"] = jnp.full_like(g["opacity_logits"], pool_lib.logit(0.8))
  pool = dict(params["field"]["pool"], active=(jnp.arange(capacity) < num).astype(jnp.float32))
  return config, scene, {**params, "field": {"gaussians": g, "pool": pool}}, points


def test_density_field_is_the_sum_of_active_gaussians():
  """density(x) = sum over active Gaussians of o exp(-|x - mu|^2 / 2 s^2) (isotropic
  here, so the closed form needs no rotation); inactive slots add nothing."""
  _, scene, params, points = ball_scene(num=50, capacity=300)
  params["field"]["gaussians"]["rotations"] = jax.random.normal(jax.random.PRNGKey(1), (300, 4))  # isotropic: no effect
  x = np.random.default_rng(1).uniform(-0.4, 0.4, (64, 3))
  density, albedo = jax.jit(scene.field_fn(params))(jnp.asarray(x, jnp.float32))
  d2 = np.sum((x[:, None] - points[None]) ** 2, -1)
  w = 0.8 * np.exp(-0.5 * d2 / 0.04**2)
  np.testing.assert_allclose(density, w.sum(-1), rtol=1e-4, atol=1e-6)
  colors = np.asarray(jax.nn.sigmoid(params["field"]["gaussians"]["color_logits"]))[:50]
  dense = w.sum(-1) > 1e-3
  np.testing.assert_allclose(np.asarray(albedo)[dense], (w @ colors)[dense] / w.sum(-1)[dense, None], rtol=1e-3)
  assert dense.sum() > 10


@pytest.mark.parametrize("opacity", [0.6, 0.9])
def test_the_toy_mesh_threshold_takes_the_rendered_silhouette(opacity):
  """A lone Gaussian's export density o exp(-x^T Sigma^-1 x / 2), at its peak along a
  pixel's ray, equals its rendered opacity there (the projection of an ellipsoid's level
  set is the projected covariance's ellipse, up to the rasterizer's perspective
  linearisation and low-pass dilation). So thresholding the density at 0.5 (the toy
  config's mesh threshold, the toy score's silhouette threshold) gives the surface
  whose silhouette is the render's opacity > 0.5; DreamGaussian's 1 gives nothing for
  a Gaussian with opacity under 1."""
  config = toy_gaussians.get_config()
  assert config.gaussians.mesh_threshold == toy_score.OPACITY_THRESHOLD
  config.gaussians.capacity = config.gaussians.num_points = 8
  scene = gaussian_scene.build_scene(config)
  params = scene.init(jax.random.PRNGKey(0))
  g = dict(params["field"]["gaussians"])
  g["means"] = g["means"].at[0].set(jnp.array([0.05, -0.03, 0.02]))
  g["log_scales"] = g["log_scales"].at[0].set(jnp.log(jnp.array([0.45, 0.25, 0.12])))
  g["rotations"] = g["rotations"].at[0].set(jnp.array([0.9, 0.3, -0.2, 0.25]))
  g["opacity_logits"] = g["opacity_logits"].at[0].set(pool_lib.logit(opacity))
  pool = dict(params["field"]["pool"], active=(jnp.arange(8) < 1).astype(jnp.float32))
  params = {**params, "field": {"gaussians": g, "pool": pool}}
  size = 48
  cams = cameras.orbit_cameras(2, elevation_deg=30.0, radius=8.0, fovy_deg=8.0, start_azimuth_deg=35.0)
  opacity_image, _ = scene.render_albedo(params, cams, size=size)
  origins, dirs = cameras.generate_rays(cams, size, size)
  t = jnp.linspace(6.5, 9.5, 1201)
  points = origins[..., None, :] + t[:, None] * dirs[..., None, :]  # (2, H, W, T, 3)
  density, _ = jax.jit(scene.field_fn(params))(points.reshape(-1, 3))
  peak = np.asarray(density).reshape(points.shape[:-1]).max(-1)
  opacity_image = np.asarray(opacity_image)
  assert (opacity_image > 0.5).sum() > 150  # a footprint of some size in both views
  np.testing.assert_allclose(peak, opacity_image, atol=0.03)
  rendered = opacity_image > 0.5
  iou = {th: (rendered & (peak > th)).sum() / (rendered | (peak > th)).sum() for th in (0.35, 0.5, 0.7)}
  assert iou[config.gaussians.mesh_threshold] > 0.9, iou
  assert iou[0.5] > max(iou[0.35], iou[0.7]) + 0.05, iou
  assert not (peak > 1.0).any()


def test_mesh_export_of_a_ball_of_gaussians(tmp_path):
  """The existing export path on the Gaussians' density at DreamGaussian's threshold
  (1) gives a closed surface around the ball, slightly outside its radius."""
  config, scene, params, _ = ball_scene()
  config.gaussians.mesh_threshold = 1.0  # configs/dreamgaussian.py's; the toy config's is 0.5
  scene = gaussian_scene.build_scene(config)
  mesh, paths, threshold = export.export_scene_mesh(config, scene, params, str(tmp_path / "ball.ply"), resolution=48,
                                                    texture=False, progress=False)
  assert threshold == 1.0 and os.path.exists(paths[0])
  r = np.linalg.norm(mesh.vertices, axis=-1)
  assert 0.27 < np.median(r) < 0.36 and r.max() < 0.4
  assert mesh.is_watertight


def test_turntable_video_of_gaussians(tmp_path):
  """The shared video path renders a Gaussian scene: frames that show the ball (not
  blank), a written mp4 and gif."""
  import imageio.v3 as iio

  from dreamfusion_jax import video

  config, scene, params, _ = ball_scene()
  paths = video.render_turntable(config, scene, params, str(tmp_path), num_frames=3, height=24, width=24,
                                 batch_size=2, progress=False)
  assert os.path.getsize(paths["mp4"]) > 0
  frames = iio.imread(paths["gif"])
  assert frames.shape[0] == 3
  rgb = frames[0, :, :24, :3].astype(float)  # the first layer: rgb over the white background
  assert rgb[12, 12].mean() < 200 and rgb[1, 1].mean() > 250  # the ball in the middle, white at the corner


@pytest.mark.parametrize("override,message", [
    (("representation", "splats"), "config.representation must be one of nerf, gaussians, got 'splats'"),
    (("gaussians.num_points", 5000), "config.gaussians.num_points must be in (0, capacity=4096], got 5000"),
    (("gaussians.tile_capacity", 0), "config.gaussians.tile_size and tile_capacity must be > 0"),
])
def test_bad_gaussian_configs_are_named(override, message):
  config = toy_gaussians.get_config()
  name, value = override
  section, _, field = name.rpartition(".")
  (config[section] if section else config)[field] = value
  with pytest.raises(train.ConfigError) as e:
    train.validate_config(config)
  assert message in str(e.value)
  train.validate_config(toy_gaussians.get_config())  # the shipped config passes


def test_dreamgaussian_config_steps_with_stable_diffusion(tmp_path):
  """configs/dreamgaussian.py through the Stable Diffusion guidance (a tiny random
  model, VAE and all) at toy sizes: two finite steps that move the Gaussians."""
  from configs import dreamgaussian
  from dreamfusion_jax.guidance import tiny

  config = dreamgaussian.get_config()
  config.guidance.model = str(tiny.build_tiny_pipeline_dir(tmp_path / "sd"))
  config.guidance.image_size = 32
  config.render.height = config.render.width = 16
  config.gaussians.capacity, config.gaussians.num_points = 256, 100
  train.validate_config(config)
  run = runs.setup_run(config)
  settings = train.StepSettings.from_config(config, num_devices=1)
  step = jax.jit(functools.partial(train.train_step, scene=run.scene, guidance=run.guidance, method=run.method,
                                   settings=settings, tx=run.tx, axis_name=None))
  state = run.state
  for _ in range(2):
    state, metrics = step(state, run.guidance_params, run.embeddings, run.base_key)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0
  before = np.asarray(run.state.params["field"]["gaussians"]["means"][:100])
  after = np.asarray(state.params["field"]["gaussians"]["means"][:100])
  assert np.abs(after - before).max() > 1e-3
