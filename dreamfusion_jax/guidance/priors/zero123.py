"""Zero-1-to-3 (Liu et al. 2023) as the prior of image-to-3D score distillation:
`config.guidance.prior = "zero123"`. Every method works with it (guidance/methods/):
its conditioning (conditioning.ImageView) carries its own unconditional branch.

A Stable Diffusion UNet fine-tuned to draw an object from a new camera given one
image of it. The conditioning, as the reference implementation (and threestudio's
`zero123_guidance.py`, stable-dreamfusion's `zero123_utils.py`) builds it:

  cross-attention context  cc_projection([CLIP image embedding of the input image,
                           T]) : (B, 1, D), T the relative camera (`relative_camera`);
  concatenated input       the input image's VAE latent (the posterior's mode, NOT
                           multiplied by the scaling factor: zero123's
                           `encode_first_stage(img).mode()`), beside the noisy
                           latents: the UNet sees 2C channels;
  unconditional branch     both zeroed (after the projection), CFG scale ~3.

The embedded view-conditioned toy prior (toy_zero123.py) is the same model in pixel
space: no vae/ in its directory, the "latent" of an image is the image in [-1, 1].

Checkpoints in the diffusers layout (kxic/zero123-xl-diffusers and the like):
unet/ (in_channels 8), vae/, image_encoder/ (transformers' CLIPVisionModelWithProjection
config and weights), cc_projection/ (config {"in_channel", "out_channel"}, weights
"projection.weight"/"projection.bias" or Flax {"projection": {"kernel", "bias"}}),
scheduler/, feature_extractor/preprocessor_config.json (the CLIP input size and
normalisation; CLIP's when absent). Flax msgpack or PyTorch-format safetensors, read
without torch (pipeline_dir.py).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from dreamfusion_jax.guidance import conditioning as conditioning_lib
from dreamfusion_jax.guidance import diffusion
from dreamfusion_jax.guidance.priors import stable_diffusion as sd
from dreamfusion_jax.guidance import pipeline_dir, sd_models
from dreamfusion_jax.guidance.pipeline_dir import (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, is_pixel_space,
                                                   is_zero123, load_params, read_json, resolve_model_dir)

Array = jax.Array
Params = Mapping[str, Any]

CAMERA_DIM = 4  # (d polar, sin d azimuth, cos d azimuth, d radius)
# CLIPImageProcessor's normalisation (OpenAI CLIP), used when a checkpoint has no
# feature_extractor/preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def relative_camera(elevation_deg: Array, azimuth_deg: Array, radius: Array, ref_elevation_deg: Array,
                    ref_azimuth_deg: Array, ref_radius: Array) -> Array:
  """Zero-1-to-3's camera T of target views relative to the input view.

  T = (polar - polar_ref [rad], sin(az - az_ref), cos(az - az_ref), r - r_ref) with
  polar = 90 deg - elevation (zero123 measures the polar angle from +z). Azimuth is
  ours (cameras.spherical_to_cartesian: counter-clockwise seen from above, +x to +y),
  the same as threestudio's, whose zero123 guidance feeds exactly these four numbers
  to the released weights (`get_cond`: deg2rad((90 - el) - (90 - el_cond)), sin and
  cos of deg2rad(az - az_cond), r - r_cond).

  Args:
    elevation_deg, azimuth_deg, radius: (...) the target cameras.
    ref_*: the input view's, broadcastable against them.

  Returns:
    (..., 4) float32.
  """
  d_polar = jnp.deg2rad(ref_elevation_deg - elevation_deg)
  d_az = jnp.deg2rad(azimuth_deg - ref_azimuth_deg)
  d_r = radius - ref_radius
  d_polar, d_az, d_r = jnp.broadcast_arrays(d_polar, d_az, d_r)
  return jnp.stack([d_polar, jnp.sin(d_az), jnp.cos(d_az), d_r], axis=-1).astype(jnp.float32)


@flax.struct.dataclass
class ImageConditioning:
  """The input image of an image-to-3D run, encoded once: a pytree for the step.

  Attributes:
    embedding: (P,) its CLIP image embedding (after the visual projection).
    latents: (h, w, C) its latents for the UNet's concatenated input.
    camera: (3,) its view: elevation_deg, azimuth_deg, radius.
  """

  embedding: Array
  latents: Array
  camera: Array

  def for_views(self, cameras, buckets: Array, perp_neg: bool = False) -> conditioning_lib.ImageView:
    """Per view: the input image's embedding and latents and the view's camera
    relative to the input's (`relative_camera`)."""
    del buckets
    if perp_neg:
      raise ValueError("Perp-Neg needs a text prior's view prompts; Zero-1-to-3 conditions on the camera itself")
    b = cameras.azimuth_deg.shape[0]
    return conditioning_lib.ImageView(
        embedding=jnp.broadcast_to(self.embedding, (b,) + self.embedding.shape),
        latents=jnp.broadcast_to(self.latents, (b,) + self.latents.shape),
        camera=relative_camera(cameras.elevation_deg, cameras.azimuth_deg, cameras.radius, self.camera[0],
                               self.camera[1], self.camera[2]),
        keep=jnp.ones((b,), jnp.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class Zero123Guidance:
  """The static half of a loaded Zero-1-to-3 (modules, constants, settings); the
  weights are the separate params {"unet", "vae", "image_encoder", "cc_projection",
  "alphas_cumprod"}. Hashable by identity, like StableDiffusionGuidance, and with its
  attributes where stable_diffusion.encode_images / decode_latents read them."""

  model: str
  unet: Any
  vae: Any  # None: pixel space
  image_encoder: Any  # transformers' FlaxCLIPVisionModel
  settings: sd.SDSSettings
  dtype: Any
  num_train_timesteps: int
  prediction_type: str
  vae_scaling_factor: float
  vae_downsample: int
  latent_channels: int
  encoder_image_size: int
  image_mean: tuple
  image_std: tuple

  @property
  def latent_size(self) -> int:
    return self.settings.image_size // self.vae_downsample

  @property
  def pixel_space(self) -> bool:
    return self.vae is None

  def noise_predictions(self, params: Params, noisy_latents: Array, t: Array,
                        branches: list[conditioning_lib.ImageView]) -> list[Array]:
    """The predictions of the same noisy latents (B, h, w, C) at t (B,) under each of
    K ImageView branches, from ONE UNet call on K B rows; the context and the input
    latents are multiplied by each row's `keep` (0: zero123's unconditional branch)."""
    k, b = len(branches), noisy_latents.shape[0]
    view = conditioning_lib.concatenate(branches)
    ctx = context(params, view.embedding, view.camera) * view.keep[:, None, None]
    latents_in = view.latents * view.keep[:, None, None, None]
    eps = predict_noise(self, params, jnp.concatenate([noisy_latents] * k), jnp.concatenate([t] * k), ctx,
                        latents_in)
    return [eps[i * b:(i + 1) * b] for i in range(k)]

  def encode(self, params: Params, images: Array, key: Array | None = None) -> Array:
    return sd.encode_images(self, params["vae"], images, key)

  def decode(self, params: Params, latents: Array) -> Array:
    return sd.decode_latents(self, params["vae"], latents)

  def encode_image(self, params: Params, image: Array, camera: tuple[float, float, float]) -> ImageConditioning:
    """The conditioning of one input image (H, W, 3) in [0, 1] seen from `camera`
    (elevation_deg, azimuth_deg, radius)."""
    return ImageConditioning(embedding=image_embedding(self, params, image[None])[0],
                             latents=image_latents(self, params, image[None])[0],
                             camera=jnp.asarray(camera, jnp.float32))


def image_embedding(guidance: Zero123Guidance, params: Params, images: Array) -> Array:
  """CLIP image embeddings (N, P) of images (N, H, W, 3) in [0, 1]: resized (bicubic,
  antialiased) to the encoder's size, normalised like CLIPImageProcessor, the pooled
  output through the visual projection (CLIPVisionModelWithProjection.image_embeds)."""
  size = guidance.encoder_image_size
  x = jax.image.resize(images, (images.shape[0], size, size, 3), method="bicubic")
  x = (x - jnp.asarray(guidance.image_mean)) / jnp.asarray(guidance.image_std)
  enc = params["image_encoder"]
  pooled = guidance.image_encoder(jnp.transpose(x, (0, 3, 1, 2)).astype(guidance.dtype),
                                  params={"vision_model": enc["vision_model"]}).pooler_output
  return (pooled @ enc["visual_projection"]["kernel"]).astype(jnp.float32)


def image_latents(guidance: Zero123Guidance, params: Params, images: Array) -> Array:
  """The concatenated input's latents (N, h, w, C) of images (N, H, W, 3) in [0, 1]:
  the VAE posterior's mode without the scaling factor (zero123's encode_first_stage
  (img).mode()), or the image in [-1, 1] for a pixel-space model."""
  latents = sd.encode_images(guidance, params["vae"], images)  # the posterior's mean = its mode
  return latents / guidance.vae_scaling_factor


def context(params: Params, embedding: Array, camera: Array) -> Array:
  """cc_projection([embedding, T]): (B, P), (B, 4) -> (B, 1, D) cross-attention context."""
  proj = params["cc_projection"]["projection"]
  x = jnp.concatenate([embedding, camera], axis=-1)
  return (x @ proj["kernel"] + proj["bias"])[:, None, :]


def predict_noise(guidance: Zero123Guidance, params: Params, noisy_latents: Array, t: Array, ctx: Array,
                  latents_in: Array) -> Array:
  """eps(z_t; input, T): the UNet on [z_t, input latents] (channels), context `ctx`.

  Args:
    noisy_latents, latents_in: (N, h, w, C). t: (N,) int32. ctx: (N, 1, D).

  Returns:
    (N, h, w, C) float32 (converted from v for v-prediction models).
  """
  x = jnp.concatenate([noisy_latents, latents_in.astype(noisy_latents.dtype)], axis=-1)
  return sd.unet_epsilon(guidance, params, x, noisy_latents, t, ctx)


def load_zero123(model: str, *, dtype: str = "float32", settings: sd.SDSSettings = sd.SDSSettings(),
                 local_files_only: bool = True, cache_dir: str | os.PathLike | None = None,
                 device=None) -> tuple[Zero123Guidance, dict[str, Any]]:
  """Loads a Zero-1-to-3 checkpoint (a directory or a cached hub id; see the module
  docstring). Checks every file and shape before anything compiles.

  Raises:
    ModelNotFoundError: not available locally, or not a Zero-1-to-3 layout.
    WeightMismatchError (a ValueError): weights that do not fit their configs.
    ValueError: bad dtype, settings or sizes.
  """
  if dtype not in sd_models.DTYPES:
    raise ValueError(f"guidance.dtype={dtype!r}; known: {tuple(sd_models.DTYPES)}")
  jdtype = sd_models.DTYPES[dtype]
  root = resolve_model_dir(model, local_files_only=local_files_only, cache_dir=cache_dir)
  if not is_zero123(root):
    raise sd.ModelNotFoundError(f"config.guidance.model={model!r} ({root}) is not a Zero-1-to-3 checkpoint: it has "
                                "no cc_projection/ (a text-to-image model goes with a prompt and "
                                "config.guidance.prior='stable_diffusion', not --config.image)")
  unet_config = read_json(root / "unet" / "config.json")
  pixel_space = is_pixel_space(root)
  latent_channels = unet_config["in_channels"] // 2
  vae_config = ({"block_out_channels": (0,), "latent_channels": latent_channels, "scaling_factor": 1.0}
                if pixel_space else read_json(root / "vae" / "config.json"))
  if unet_config["in_channels"] != 2 * vae_config.get("latent_channels", 4):
    raise ValueError(f"{root}/unet: in_channels {unet_config['in_channels']} must be twice the latent channels "
                     f"{vae_config.get('latent_channels', 4)} (noisy latents + the input image's)")
  vae_downsample = 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)
  sd.check_sizes(settings, unet_config, vae_downsample)
  alphas_cumprod, prediction_type = diffusion.read_scheduler(
      read_json(root / "scheduler" / "scheduler_config.json"), f"{root}/scheduler")
  encoder_config = read_json(root / "image_encoder" / "config.json")
  preprocessor_path = root / "feature_extractor" / "preprocessor_config.json"
  preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else {}
  projection_config = read_json(root / "cc_projection" / "config.json")

  unet, unet_shapes = sd_models.unet_from_config(unet_config, jdtype)
  vae, vae_shapes = (None, {}) if pixel_space else sd_models.vae_from_config(vae_config, jdtype)
  image_encoder, encoder_shapes = sd_models.image_encoder_from_config(encoder_config, jdtype)
  proj_in, proj_out = int(projection_config["in_channel"]), int(projection_config["out_channel"])
  if proj_in != encoder_shapes["visual_projection"]["kernel"].shape[1] + CAMERA_DIM:
    raise ValueError(f"{root}/cc_projection: in_channel {proj_in} must be the image embedding's "
                     f"{encoder_shapes['visual_projection']['kernel'].shape[1]} + {CAMERA_DIM} camera numbers")
  projection_shapes = {"projection": {"kernel": jax.ShapeDtypeStruct((proj_in, proj_out), jnp.float32),
                                      "bias": jax.ShapeDtypeStruct((proj_out,), jnp.float32)}}
  params = {
      "unet": load_params(root / "unet", DIFFUSERS_WEIGHTS, unet_shapes, jdtype),
      "vae": {} if pixel_space else load_params(root / "vae", DIFFUSERS_WEIGHTS, vae_shapes, jdtype),
      "image_encoder": load_params(root / "image_encoder", TRANSFORMERS_WEIGHTS, encoder_shapes, jdtype),
      "cc_projection": load_params(root / "cc_projection", DIFFUSERS_WEIGHTS, projection_shapes, jnp.float32),
      "alphas_cumprod": alphas_cumprod,
  }
  size = preprocessor.get("crop_size", preprocessor.get("size", encoder_config.get("image_size", 224)))
  if isinstance(size, Mapping):  # {"height": h, "width": w} or {"shortest_edge": s}
    size = size.get("height", size.get("shortest_edge"))
  guidance = Zero123Guidance(
      model=model, unet=unet, vae=vae, image_encoder=image_encoder, settings=settings, dtype=jdtype,
      num_train_timesteps=len(params["alphas_cumprod"]), prediction_type=prediction_type,
      vae_scaling_factor=float(vae_config.get("scaling_factor", 0.18215)), vae_downsample=vae_downsample,
      latent_channels=int(vae_config.get("latent_channels", 4)), encoder_image_size=int(size),
      image_mean=tuple(preprocessor.get("image_mean", CLIP_MEAN)), image_std=tuple(preprocessor.get("image_std", CLIP_STD)))
  return guidance, jax.device_put(params, device)


def write_zero123_dir(path: str | os.PathLike, params: Mapping[str, Mapping], *, fmt: str, unet_config: Mapping,
                      vae_config: Mapping | None, image_encoder_config: Mapping, scheduler_config: Mapping,
                      preprocessor_config: Mapping | None = None) -> pathlib.Path:
  """Writes {"unet", "vae", "image_encoder", "cc_projection"} params in the layout
  `load_zero123` reads (fmt "flax" or "safetensors", see pipeline_dir.write_component);
  no vae/ when vae_config is None (pixel space). Not atomic: write into a fresh
  directory and rename it."""
  root = pathlib.Path(path)
  prefix = "Flax" if fmt == "flax" else ""
  kernel = params["cc_projection"]["projection"]["kernel"]
  components = {
      "unet": ({"_class_name": f"{prefix}UNet2DConditionModel", **unet_config}, DIFFUSERS_WEIGHTS),
      "image_encoder": (dict(image_encoder_config), TRANSFORMERS_WEIGHTS),
      "cc_projection": ({"_class_name": "CCProjection", "in_channel": int(kernel.shape[0]),
                         "out_channel": int(kernel.shape[1])}, DIFFUSERS_WEIGHTS),
  }
  if vae_config is not None:
    components["vae"] = ({"_class_name": f"{prefix}AutoencoderKL", **vae_config}, DIFFUSERS_WEIGHTS)
  for name, (config, weight_files) in components.items():
    pipeline_dir.write_component(root / name, config, params[name], weight_files, fmt=fmt)
  pipeline_dir.write_json(root / "scheduler" / "scheduler_config.json", scheduler_config)
  if preprocessor_config is not None:
    pipeline_dir.write_json(root / "feature_extractor" / "preprocessor_config.json", preprocessor_config)
  index = {"_class_name": "Zero1to3StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
           "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
           "cc_projection": ["diffusers_modules.local.pipeline_zero1to3", "CCProjection"],
           "scheduler": ["diffusers", "DDIMScheduler"]}
  if vae_config is not None:
    index["vae"] = ["diffusers", "AutoencoderKL"]
  pipeline_dir.write_json(root / "model_index.json", index)
  return root


# What this prior conditions on: an input image and the view's camera (runs.py reads it).
CONDITIONS_ON = "image"


def from_config(cfg, **kwargs) -> tuple[Zero123Guidance, dict[str, Any]]:
  """load_zero123 with the fields of `config.guidance` (those of
  stable_diffusion.from_config; guidance_scale ~3 for Zero-1-to-3)."""
  settings = sd.settings_from_config(cfg)
  return load_zero123(cfg.get("model"), dtype=cfg.get("dtype", "float32"), settings=settings, **kwargs)
