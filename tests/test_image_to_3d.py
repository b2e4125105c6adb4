"""Image-to-3D's system (issue 18): the input image's reading and masking, the
reference-view loss against closed forms, the toy input renders, the view-conditioned
toy prior's training step, and bad input to scripts/train.py with --config.image."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dreamfusion_jax import errors, losses, reference_image, toy_prior, toy_score, toy_world, toy_zero123

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_view_loss_closed_form():
  rgb = jnp.full((4, 4, 3), 0.5)
  opacity = jnp.full((4, 4), 0.25)
  target = jnp.zeros((4, 4, 3)).at[:2].set(1.0)
  mask = jnp.zeros((4, 4)).at[:2].set(1.0)
  background = jnp.array([0.0, 0.0, 1.0])
  rgb_loss, mask_loss = losses.reference_view_loss(rgb, opacity, target, mask, background)
  # Top half: target white, error 0.5 in every channel. Bottom half: the background
  # (0, 0, 1): errors 0.5, 0.5, 0.5. Every squared error is 0.25.
  assert float(rgb_loss) == pytest.approx(0.25)
  # Mask: (0.25 - 1)^2 on half the pixels, 0.25^2 on the other half.
  assert float(mask_loss) == pytest.approx(0.5 * 0.75**2 + 0.5 * 0.25**2)


def test_rgba_alpha_is_the_mask_and_rgb_background_is_masked(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[2:6, 3:5] = (200, 10, 10, 255)
  Image.fromarray(rgba).save(tmp_path / "a.png")
  rgb, mask = reference_image.read_image(tmp_path / "a.png")
  np.testing.assert_array_equal(mask, rgba[..., 3] / 255.0)
  # The same object on a plain grey background, as RGB.
  plain = np.full((8, 8, 3), 128, np.uint8)
  plain[2:6, 3:5] = (200, 10, 10)
  Image.fromarray(plain).save(tmp_path / "b.png")
  rgb, mask = reference_image.read_image(tmp_path / "b.png")
  np.testing.assert_array_equal(mask, (rgba[..., 3] > 0).astype(np.float32))
  np.testing.assert_allclose(rgb[3, 3], np.array([200, 10, 10]) / 255.0, atol=1e-6)


def test_recentring_scales_and_centres_the_objects_box(tmp_path):
  # A 6x4 red box off-centre in a 20x30 RGBA image; its longer side to half the frame:
  # scale 30 * 0.5 / 6 = 2.5, so a 15x10 box on the 30x30 canvas at rows 7:22, cols 10:20.
  rgba = np.zeros((20, 30, 4), np.uint8)
  rgba[2:8, 20:24] = (200, 10, 10, 255)
  Image.fromarray(rgba).save(tmp_path / "a.png")
  with pytest.raises(errors.InputError, match="is 30x20: the input must be square"):
    reference_image.read_image(tmp_path / "a.png")
  rgb, mask = reference_image.read_image(tmp_path / "a.png", object_size=0.5)
  assert rgb.shape == (30, 30, 3) and mask.shape == (30, 30)
  expected = np.zeros((30, 30), np.float32)
  expected[7:22, 10:20] = 1.0
  np.testing.assert_allclose(mask, expected, atol=1e-5)
  np.testing.assert_allclose(rgb[7:22, 10:20], np.broadcast_to(np.array([200, 10, 10]) / 255.0, (15, 10, 3)),
                             atol=1e-5)
  assert rgb[mask < 0.5].max() == 0.0
  # A centred object already at the asked size comes back as it was.
  square = np.zeros((16, 16, 4), np.float32)
  square[4:12, 6:10] = (0.2, 0.4, 0.6, 1.0)
  rgb2, mask2 = reference_image.recenter(square[..., :3], square[..., 3], 0.5)
  np.testing.assert_allclose(mask2, square[..., 3], atol=1e-5)
  np.testing.assert_allclose(rgb2, square[..., :3], atol=1e-5)
  with pytest.raises(errors.InputError, match="object_size must lie in"):
    reference_image.recenter(square[..., :3], square[..., 3], 1.5)


def test_a_recentred_photo_becomes_the_runs_conditioning(tmp_path):
  # The run's path (runs.py -> image_conditioning) with object_size: a non-square RGB
  # photo, the object off-centre on a plain background, reaches the render size centred.
  photo = np.full((48, 64, 3), 230, np.uint8)
  photo[4:16, 40:52] = (20, 40, 200)  # a 12x12 blue square near the top right
  Image.fromarray(photo).save(tmp_path / "photo.png")
  guidance, params = toy_zero123.load()
  ref = reference_image.image_conditioning(guidance, params, tmp_path / "photo.png", camera=(15.0, 0.0, 1.7),
                                           render_size=(32, 32), object_size=0.5)
  mask = np.asarray(ref.mask)
  assert mask.shape == (32, 32)
  # A 16x16 box (half of 32) at rows and cols 8:24; the antialiased downsizing from the
  # 64x64 canvas softens the one-pixel rim only.
  np.testing.assert_allclose(mask[9:23, 9:23], 1.0, atol=1e-5)
  assert mask[:7].max() == mask[25:].max() == mask[:, :7].max() == mask[:, 25:].max() == 0.0
  assert mask.sum() == pytest.approx(16 * 16, rel=0.02)
  rows, cols = np.indices(mask.shape)
  assert (mask * rows).sum() / mask.sum() == pytest.approx(15.5, abs=0.05)
  assert (mask * cols).sum() / mask.sum() == pytest.approx(15.5, abs=0.05)
  np.testing.assert_allclose(np.asarray(ref.rgb)[16, 16], np.array([20, 40, 200]) / 255.0, atol=1e-5)


@pytest.mark.parametrize("make,message", [
    (lambda p: Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(p), "is 6x8: the input must be square"),
    (lambda p: Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(p), "no object found"),
    (lambda p: open(p, "w").write("not an image"), "is not a readable image"),
])
def test_bad_images_are_named(tmp_path, make, message):
  path = str(tmp_path / "in.png")
  make(path)
  with pytest.raises(errors.InputError, match=message):
    reference_image.read_image(path)


def test_toy_input_view_matches_the_scoring_renders():
  # The input of a toy image-to-3D run is the toy world's own render: its silhouette
  # from (15, 0) equals the ground truth's that toy_score compares against.
  _, opacity = toy_world.render_view("a yellow cone", elevation_deg=15.0, azimuth_deg=0.0,
                                     radius=toy_score.CAMERA_RADIUS, fovy_deg=toy_score.FOVY_DEG,
                                     size=toy_score.VIEW_SIZE)
  truth = toy_score.ground_truth("cone")["opacity"][toy_score.SILHOUETTE_ELEVATIONS_DEG.index(15.0)
                                                   * toy_score.VIEWS_PER_ELEVATION]
  assert toy_score.mask_iou(opacity > 0.5, truth > 0.5) > 0.98
  other = toy_score.ground_truth("sphere")["opacity"][toy_score.SILHOUETTE_ELEVATIONS_DEG.index(15.0)
                                                     * toy_score.VIEWS_PER_ELEVATION]
  assert toy_score.mask_iou(opacity > 0.5, other > 0.5) < 0.9


def test_toy_image_script_writes_rgba_and_rejects_bad_views(tmp_path):
  out = tmp_path / "torus.png"
  cmd = [sys.executable, "scripts/toy_image.py", "--prompt=a green torus", "--elevation=90", "--size=64",
         f"--out={out}"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  rgba = np.asarray(Image.open(out))
  assert rgba.shape == (64, 64, 4)
  assert toy_score.centre_opacity(rgba[..., 3] / 255.0) < 0.5  # the hole, seen from above
  assert rgba[..., 3].max() == 255
  assert toy_world.closest_color(rgba[rgba[..., 3] > 250][:, :3].mean(0) / 255.0) == "green"
  bad = subprocess.run(cmd[:2] + ["--prompt=a purple cube", "--elevation=95", f"--out={tmp_path / 'x.png'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert "--prompt" in bad.stderr and "--elevation=95.0 must lie in [-90, 90]" in bad.stderr
  assert not (tmp_path / "x.png").exists()


def test_pairs_are_views_of_one_object():
  rng = np.random.default_rng(0)
  src, dst = toy_zero123.sample_pairs(rng, 16 * 8, 8, 256)
  np.testing.assert_array_equal(src // 8, dst // 8)
  assert len(np.unique(src // 8)) == 16 and not np.all(src == dst)


@pytest.fixture(scope="module")
def tiny_data():
  data = toy_prior.render_dataset(seed=3, per_object=2)
  assert set(toy_prior.CAMERA_FIELDS) <= set(data)
  return data


def test_training_pairs_carry_the_relative_camera(tiny_data):
  src, dst = np.array([0, 2]), np.array([1, 3])
  cam = toy_zero123.pair_cameras(tiny_data, src, dst)
  el, az, r = (tiny_data[f] for f in toy_prior.CAMERA_FIELDS)
  np.testing.assert_allclose(cam[:, 0], np.deg2rad(el[src] - el[dst]), atol=1e-6)
  np.testing.assert_allclose(cam[:, 1], np.sin(np.deg2rad(az[dst] - az[src])), atol=1e-6)
  np.testing.assert_allclose(cam[:, 3], r[dst] - r[src], atol=1e-6)


def test_prior_training_step_learns_a_fixed_batch(tmp_path, tiny_data):
  # A few Adam steps on one batch of pairs must lower its denoising loss: the
  # gradient reaches the UNet, the image encoder and cc_projection.
  toy_zero123.write_prior_dir(tmp_path / "init", toy_zero123.init_params(0))
  guidance, gparams = toy_zero123.load(tmp_path / "init")
  params = {k: gparams[k] for k in ("unet", "image_encoder", "cc_projection")}
  tx = toy_prior.make_optimizer(1e-3, 0)
  state = toy_prior.PriorState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                               opt_state=tx.init(params))
  src, dst = np.arange(0, 32, 2), np.arange(1, 32, 2)
  images = jnp.asarray(tiny_data["images"])
  camera = jnp.asarray(toy_zero123.pair_cameras(tiny_data, src, dst))
  abar = gparams["alphas_cumprod"]
  step = jax.jit(toy_zero123.make_train_step(guidance, tx, uncond_prob=0.0))
  for _ in range(8):  # each step draws its own t and noise (fold_in(key, step))
    state, _ = step(state, abar, images[src], images[dst], camera, jax.random.PRNGKey(0))
  x = lambda idx: images[idx].astype(jnp.float32) / 127.5 - 1.0
  t = jnp.full((16,), 300, jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(5), (16, 32, 32, 3))
  ones = jnp.ones((16,))
  before = toy_zero123.denoising_loss(guidance, {**gparams}, abar, x(src), x(dst), camera, ones, t, noise)
  after = toy_zero123.denoising_loss(guidance, {**gparams, **state.params}, abar, x(src), x(dst), camera, ones, t,
                                     noise)
  assert float(after) < 0.8 * float(before)
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, state.params)
  assert changed["image_encoder"]["visual_projection"]["kernel"]
  assert changed["cc_projection"]["projection"]["kernel"]


def test_prior_training_resumes_bit_exactly(tmp_path, monkeypatch):
  # The shared loop (toy_prior.run_training) with the view-conditioned step: 2 steps,
  # stop, 2 more from the checkpoint == 4 steps at once. The export's gaps and
  # sample grid are another test's business: stubbed to keep this one cheap.
  monkeypatch.setattr(toy_zero123, "conditioning_gaps", lambda *a, **k: {"camera": 0.0, "image": 0.0, "total": 0.0})
  monkeypatch.setattr(toy_zero123, "save_sample_grid", lambda *a, **k: None)
  kwargs = dict(batch_size=4, per_object=2, ckpt_every=2, export_every=100, log_every=1)
  whole = toy_zero123.train_prior(str(tmp_path / "a"), steps=4, out_dir=tmp_path / "out_a", **kwargs)
  (tmp_path / "b").mkdir()  # the same data set and start, without rendering and initialising them again
  shutil.copy(tmp_path / "a" / "dataset.npz", tmp_path / "b")
  shutil.copytree(tmp_path / "a" / "init", tmp_path / "b" / "init")
  toy_zero123.train_prior(str(tmp_path / "b"), steps=2, out_dir=tmp_path / "out_b", **kwargs)
  resumed = toy_zero123.train_prior(str(tmp_path / "b"), steps=4, out_dir=tmp_path / "out_b", **kwargs)
  assert int(resumed.step) == 4
  same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                whole.ema_params, resumed.ema_params)
  assert all(jax.tree_util.tree_leaves(same))
  _, start = toy_zero123.load(tmp_path / "a" / "init")
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                 whole.params["cc_projection"], start["cc_projection"])
  assert not all(jax.tree_util.tree_leaves(moved))  # training moved the weights: the comparison can fail
  _, loaded = toy_zero123.load(tmp_path / "out_b")  # the export loads as a Zero-1-to-3
  np.testing.assert_array_equal(np.asarray(loaded["cc_projection"]["projection"]["kernel"]),
                                np.asarray(resumed.ema_params["cc_projection"]["projection"]["kernel"]))


def test_expanded_conv_in_ignores_the_new_channels():
  # Zero-1-to-3's start: the widened conv on [x, y] is the original conv on x, for any y.
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((3, 3, 3, 8)).astype(np.float32)
  wide = toy_zero123.expand_conv_in(kernel, 6)
  x, y = (jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32) for _ in range(2))
  conv = lambda inp, k: jax.lax.conv_general_dilated(inp, jnp.asarray(k), (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv(jnp.concatenate([x, y], -1), wide), conv(x, kernel), atol=1e-5)
  assert float(jnp.abs(conv(y, kernel)).max()) > 0.1  # y alone through the old kernel is not nothing
  with pytest.raises(ValueError, match="narrow"):
    toy_zero123.expand_conv_in(kernel, 2)


def test_the_view_prior_unet_starts_from_the_text_prior():
  # Every UNet weight is the shipped text prior's; conv_in's first 3 input channels
  # (the noisy view) are its conv_in, the input view's 3 start at zero.
  _, text = toy_prior.load()
  text_unet = jax.device_get(text["unet"])
  unet = toy_zero123.init_params(0, unet_from=toy_prior.PRIOR_DIR)["unet"]
  random_unet = toy_zero123.init_params(0)["unet"]
  flat = lambda tree: dict(jax.tree_util.tree_leaves_with_path(tree))
  text_flat, unet_flat, random_flat = flat(text_unet), flat(unet), flat(random_unet)
  assert set(unet_flat) == set(text_flat) == set(random_flat)
  for path, leaf in unet_flat.items():
    if "conv_in" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(leaf[:, :, :3], text_flat[path])
      assert not np.any(leaf[:, :, 3:]) and np.any(random_flat[path][:, :, 3:])
    else:
      np.testing.assert_array_equal(leaf, text_flat[path])
  assert not np.array_equal(random_flat[next(iter(random_flat))], text_flat[next(iter(random_flat))])
