"""Zero-1-to-3 guidance (guidance/priors/zero123.py): the camera against closed forms, and
parity with PyTorch on tiny random models built the same way on both sides
(diffusers' UNet2DConditionModel with 8 input channels and AutoencoderKL,
transformers' CLIPVisionModelWithProjection, a torch Linear as cc_projection), saved
by their own save_pretrained into the diffusers layout and loaded without torch."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from dreamfusion_jax import cameras
from dreamfusion_jax.guidance import diffusion
from dreamfusion_jax.guidance.priors import stable_diffusion as sd
from dreamfusion_jax.guidance import conditioning, distill, methods, tiny
from dreamfusion_jax.guidance.priors import zero123

ENCODER_CONFIG = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "image_size": 32, "patch_size": 8, "projection_dim": 24, "hidden_act": "quick_gelu"}
CAMERA = (20.0, 30.0, 1.8)  # the input view: elevation, azimuth, radius
SETTINGS = sd.SDSSettings(image_size=tiny.TINY_IMAGE_SIZE, guidance_scale=3.0)


@pytest.mark.parametrize("target,want", [
    ((20.0, 30.0, 1.8), (0.0, 0.0, 1.0, 0.0)),  # the input view itself
    ((50.0, 30.0, 1.8), (np.deg2rad(-30.0), 0.0, 1.0, 0.0)),  # higher: the polar angle shrinks
    ((20.0, 120.0, 2.0), (0.0, 1.0, 0.0, 0.2)),  # a quarter turn counter-clockwise, further away
    ((-10.0, -150.0, 1.8), (np.deg2rad(30.0), 0.0, -1.0, 0.0)),  # behind and below
])
def test_relative_camera_closed_form(target, want):
  got = zero123.relative_camera(*(jnp.float32(v) for v in target), *CAMERA)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


@pytest.fixture(scope="module")
def torch_zero123(tmp_path_factory):
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**{**tiny.TINY_UNET_CONFIG, "in_channels": 8}).eval()
  vae = diffusers.AutoencoderKL(**tiny.TINY_VAE_CONFIG).eval()
  encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**ENCODER_CONFIG)).eval()
  projection = torch.nn.Linear(ENCODER_CONFIG["projection_dim"] + 4, tiny.TINY_UNET_CONFIG["cross_attention_dim"])
  with torch.no_grad():  # default inits leave norms at 1/0 and some layers at 0
    for model in (unet, vae, encoder, projection):
      for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("torch_zero123")
  unet.save_pretrained(root / "unet", safe_serialization=True)
  vae.save_pretrained(root / "vae", safe_serialization=True)
  encoder.save_pretrained(root / "image_encoder", safe_serialization=True)
  (root / "cc_projection").mkdir()
  (root / "cc_projection" / "config.json").write_text(json.dumps(
      {"_class_name": "CCProjection", "in_channel": projection.in_features, "out_channel": projection.out_features}))
  safetensors.torch.save_file({f"projection.{k}": v.contiguous() for k, v in projection.state_dict().items()},
                              str(root / "cc_projection" / "diffusion_pytorch_model.safetensors"))
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.TINY_SCHEDULER_CONFIG))
  (root / "feature_extractor").mkdir()
  mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
  (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(
      {"crop_size": {"height": 32, "width": 32}, "image_mean": mean, "image_std": std}))
  (root / "model_index.json").write_text(json.dumps({"_class_name": "Zero1to3StableDiffusionPipeline",
                                                     "vae": ["diffusers", "AutoencoderKL"]}))
  guidance, params = zero123.load_zero123(str(root), settings=SETTINGS)
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(32, 32, 3)).astype(np.float32)
  return dict(unet=unet, vae=vae, encoder=encoder, projection=projection, guidance=guidance, params=params,
              image=image, mean=np.float32(mean), std=np.float32(std), root=root)


def _relative_error(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _reference_conditioning(m):
  """The input image's embedding and concat latents, computed by the PyTorch models."""
  x = (m["image"] - m["mean"]) / m["std"]
  with torch.no_grad():
    emb = m["encoder"](pixel_values=torch.from_numpy(x).permute(2, 0, 1)[None]).image_embeds
    latents = m["vae"].encode(torch.from_numpy(m["image"] * 2 - 1).permute(2, 0, 1)[None]).latent_dist.mode()
  return emb, latents


def test_image_encoding_matches_pytorch(torch_zero123):
  m = torch_zero123
  cond = m["guidance"].encode_image(m["params"], jnp.asarray(m["image"]), CAMERA)
  emb, latents = _reference_conditioning(m)
  assert _relative_error(cond.embedding, emb[0].numpy()) < 1e-4
  # The posterior's mode, not scaled by the VAE's scaling factor (zero123's c_concat).
  assert _relative_error(cond.latents, latents[0].permute(1, 2, 0).numpy()) < 1e-4
  np.testing.assert_array_equal(np.asarray(cond.camera), np.float32(CAMERA))


def test_guided_noise_matches_pytorch(torch_zero123):
  m = torch_zero123
  guidance, params = m["guidance"], m["params"]
  cams = cameras.orbit_cameras(2, elevation_deg=35.0, radius=1.8, fovy_deg=40.0, start_azimuth_deg=75.0)
  cond = guidance.encode_image(params, jnp.asarray(m["image"]), CAMERA).for_views(cams, jnp.zeros((2,), jnp.int32))
  rng = np.random.default_rng(1)
  noisy = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  t = np.array([50, 800], np.int32)
  ours = jax.jit(lambda p, c: conditioning.guided_noise(guidance, p, noisy, t, c, 3.0))(params, cond)

  emb, latents = _reference_conditioning(m)
  d_az = np.deg2rad([75.0 - 30.0, 255.0 - 30.0])
  camera = torch.tensor(np.stack([np.full(2, np.deg2rad(20.0 - 35.0)), np.sin(d_az), np.cos(d_az), np.zeros(2)], -1),
                        dtype=torch.float32)
  with torch.no_grad():
    ctx = m["projection"](torch.cat([emb.expand(2, -1), camera], -1))[:, None]
    x = torch.from_numpy(noisy).permute(0, 3, 1, 2)
    lat = latents.expand(2, -1, -1, -1)
    tt = torch.from_numpy(t).long()
    eps_c = m["unet"](torch.cat([x, lat], 1), tt, ctx).sample
    eps_u = m["unet"](torch.cat([x, torch.zeros_like(lat)], 1), tt, torch.zeros_like(ctx)).sample
    want = (eps_u + 3.0 * (eps_c - eps_u)).permute(0, 2, 3, 1).numpy()
  # diffusers' Flax GEGLU uses tanh-GELU, the PyTorch one the exact GELU (~1e-4).
  assert _relative_error(ours, want) < 2e-3
  assert _relative_error(ours, eps_c.permute(0, 2, 3, 1).numpy()) > 0.05  # the guidance matters here


def test_latent_gradient_is_weighted_residual(torch_zero123):
  m = torch_zero123
  guidance, params = m["guidance"], m["params"]
  cams = cameras.orbit_cameras(2, elevation_deg=0.0, radius=1.8, fovy_deg=40.0)
  cond = guidance.encode_image(params, jnp.asarray(m["image"]), CAMERA).for_views(cams, jnp.zeros((2,), jnp.int32))
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)).astype(np.float32))
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  t_range = jnp.array([0.2, 0.8])
  # Rebuild the loss on latents directly: the surrogate's latent gradient must be
  # w(t) (eps_hat(z_t) - eps) / B with the draws of each image's own key.
  k_t, k_noise, _ = diffusion.split_draw_keys(keys)
  latents = sd.encode_images(guidance, params["vae"], images)
  t, noise = diffusion.sample_timesteps_and_noise(k_t, k_noise, latents.shape, t_range, guidance.num_train_timesteps)
  abar = params["alphas_cumprod"]
  eps_hat = conditioning.guided_noise(guidance, params, diffusion.add_noise(abar, latents, noise, t), t, cond, 3.0)
  w = (1.0 - abar[t])[:, None, None, None]
  want = w * (eps_hat - noise) / 2
  # d loss / d images = J_enc^T (d loss / d latents): compare through the encoder's VJP.
  _, vjp = jax.vjp(lambda x: sd.encode_images(guidance, params["vae"], x), images)
  got = jax.grad(lambda x: distill.loss(guidance, methods.get("sds"), params, x, cond, keys, t_range)[0])(images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(vjp(want)[0]), rtol=1e-4, atol=1e-5)


def test_each_prior_refuses_the_other_ones_directory(torch_zero123, tmp_path):
  """The prior is named (config.guidance.prior), never guessed from the directory: each
  loader checks that the directory fits it, in one line naming the field to set."""
  sd_dir = tiny.build_tiny_pipeline_dir(tmp_path / "sd")
  with pytest.raises(sd.ModelNotFoundError, match="not a Zero-1-to-3 checkpoint.*prior='stable_diffusion'"):
    zero123.load_zero123(str(sd_dir), settings=SETTINGS)
  import ml_collections  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict({"model": str(torch_zero123["root"]), "image_size": 32, "guidance_scale": 3.0})
  with pytest.raises(sd.ModelNotFoundError, match="is a Zero-1-to-3 checkpoint.*prior='zero123'"):
    sd.from_config(cfg)
  guidance, _ = zero123.from_config(cfg)
  assert guidance.settings.guidance_scale == 3.0 and guidance.latent_channels == 4


def test_missing_component_is_named(torch_zero123, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top

  broken = tmp_path / "broken"
  shutil.copytree(torch_zero123["root"], broken)
  (broken / "image_encoder" / "model.safetensors").unlink()
  with pytest.raises(sd.ModelNotFoundError, match="image_encoder/"):
    zero123.load_zero123(str(broken), settings=SETTINGS)
