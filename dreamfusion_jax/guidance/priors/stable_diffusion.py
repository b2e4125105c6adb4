"""Stable Diffusion (Flax, frozen) as a prior of score distillation: `config.guidance.prior = "stable_diffusion"`.

The static `StableDiffusionGuidance` assembled from a checkpoint (`load_stable_diffusion`,
`from_config`) with the prior contract (guidance/priors/__init__.py): `encode` /
`decode` images, `noise_predictions` under K conditionings in one UNet call,
`encode_prompts`. Finding and reading the checkpoint directory (diffusers layout) is
pipeline_dir.py's; building the Flax modules from their configs, sd_models.py's (which
imports diffusers and transformers). The embedded toy text prior is this prior in
pixel space (no vae/).

Usage (params are arguments, the prior object is static):

    prior, params = from_config(config.guidance)
    embeddings = make_prompt_embeddings(prior, params, config.prompt, config.guidance.negative_prompt,
                                        config.guidance.view_dependent)
    cond = embeddings.for_views(cams, buckets, perp_neg=False)         # conditioning.TextPair
    loss, metrics = distill.loss(prior, methods.get("sds"), params, images, cond, key)

Config fields (`config.guidance`, read by `settings_from_config`):
  model            hub id (resolved from the local HF cache only) or a directory in
                   the diffusers layout.
  dtype            "float32" or "bfloat16": frozen weights and UNet/VAE/CLIP
                   activations. The noise schedule and the distillation math stay float32.
  guidance_scale   classifier-free guidance scale s.
  t_min, t_max     timestep range as fractions of the training timesteps.
  weighting        w(t): "sds" (1 - alpha_bar), "uniform", "fantasia3d".
  grad_clip        elementwise clip of the latent gradient; 0 or None: off.
  image_size       VAE input size; renders are resized (bilinear) to it.
  sample_posterior encode to a sample of the VAE posterior instead of its mean.
  method, ism_delta_t, ism_inv_steps, vsd_lora_rank, vsd_lr
                   the method and its values (guidance/methods/).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from dreamfusion_jax.guidance import diffusion
from dreamfusion_jax.guidance.settings import SDSSettings, settings_from_config
from dreamfusion_jax.guidance.pipeline_dir import (DEFAULT_MODEL, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS,
                                                   ModelNotFoundError, is_pixel_space, is_zero123, load_params, read_json,
                                                   resolve_model_dir)
from dreamfusion_jax.guidance.prompts import PromptEmbeddings, make_prompt_embeddings, select_embeddings
from dreamfusion_jax.guidance.sd_models import (DTYPES, CLIPTokenizer, FlaxAutoencoderKL, FlaxCLIPTextModel,
                                                FlaxUNet2DConditionModel, load_tokenizer, text_encoder_from_config,
                                                unet_from_config, vae_from_config)

Array = jax.Array
Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusionGuidance:
  """The static half of a loaded Stable Diffusion: module definitions, tokenizer,
  constants and settings. Hashable by identity, so it can be closed over or passed
  as a static argument of jax.jit; the weights live in the separate `params`:
  {"unet", "vae", "text_encoder": Flax param trees, "alphas_cumprod": (T,) float32}.
  """

  model: str
  unet: FlaxUNet2DConditionModel
  vae: FlaxAutoencoderKL | None  # None: a pixel-space model
  text_encoder: FlaxCLIPTextModel
  tokenizer: CLIPTokenizer
  settings: SDSSettings
  dtype: Any
  num_train_timesteps: int
  prediction_type: str  # "epsilon" or "v_prediction"
  vae_scaling_factor: float
  vae_downsample: int  # image size / latent size
  latent_channels: int

  @property
  def latent_size(self) -> int:
    """Side of the latents the UNet sees: image_size / vae_downsample."""
    return self.settings.image_size // self.vae_downsample

  @property
  def pixel_space(self) -> bool:
    return self.vae is None

  def noise_predictions(self, params: Params, noisy_latents: Array, t: Array, branches: Sequence[Array]) -> list[Array]:
    """See `predict_noise_per_embedding`: branches are (B, L, D) text embeddings."""
    return predict_noise_per_embedding(self, params, noisy_latents, t, branches)

  def encode_prompts(self, params: Params, prompts: Sequence[str]) -> Array:
    """Text embeddings (N, L, D) float32 of N prompts (L = tokenizer max length, 77)."""
    # Some tokenizer configs leave model_max_length at a huge sentinel value.
    length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
    ids = self.tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="np").input_ids
    return _encode_token_ids(self, params["text_encoder"], jnp.asarray(ids, jnp.int32))

  def encode(self, params: Params, images: Array, key: Array | None = None) -> Array:
    """See `encode_images`."""
    return encode_images(self, params["vae"], images, key)

  def decode(self, params: Params, latents: Array) -> Array:
    """See `decode_latents`."""
    return decode_latents(self, params["vae"], latents)


@functools.partial(jax.jit, static_argnums=0)
def _encode_token_ids(guidance: StableDiffusionGuidance, text_params: Params, ids: Array) -> Array:
  # Stable Diffusion conditions on the last hidden state (after the final layer norm)
  # of all L tokens, padding included, without an attention mask.
  hidden = guidance.text_encoder(ids, params=text_params)[0]
  return hidden.astype(jnp.float32)


def _resize(x: Array, size: int) -> Array:
  """(B, H, W, C) -> (B, size, size, C), bilinear (antialiased when shrinking)."""
  if x.shape[1:3] == (size, size):
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bilinear")


def encode_images(guidance: StableDiffusionGuidance, vae_params: Params, images: Array,
                  key: Array | None = None) -> Array:
  """Rendered images -> scaled latents, differentiably (the SDS gradient goes back
  through the encoder).

  Args:
    images: (B, H, W, 3) float32 in [0, 1]; resized to settings.image_size.
    key: PRNG key or (B, 2) per-image keys, used only with settings.sample_posterior.

  Returns:
    (B, h, w, C) float32 latents z * scaling_factor (h = image_size / vae_downsample).
  """
  x = _resize(images, guidance.settings.image_size) * 2.0 - 1.0
  if guidance.vae is None:  # pixel space
    return x.astype(jnp.float32)
  x = jnp.transpose(x, (0, 3, 1, 2)).astype(guidance.dtype)  # diffusers' Flax VAE takes NCHW
  posterior = guidance.vae.apply({"params": vae_params}, x, method=guidance.vae.encode).latent_dist
  if guidance.settings.sample_posterior:
    mean = posterior.mean
    if jnp.ndim(key) == 2:  # one key per image
      eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(key)
    else:
      eps = jax.random.normal(key, mean.shape, mean.dtype)
    latents = mean + posterior.std * eps
  else:
    latents = posterior.mean
  return latents.astype(jnp.float32) * guidance.vae_scaling_factor


def decode_latents(guidance: StableDiffusionGuidance, vae_params: Params, latents: Array) -> Array:
  """Scaled latents (B, h, w, C) -> images (B, H, W, 3) float32 in [0, 1] (for viewing)."""
  if guidance.vae is None:  # pixel space
    return jnp.clip(latents.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
  z = (latents / guidance.vae_scaling_factor).astype(guidance.dtype)
  x = guidance.vae.apply({"params": vae_params}, z, method=guidance.vae.decode).sample  # NCHW
  return jnp.clip(jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)


def predict_noise(guidance: StableDiffusionGuidance, params: Params, noisy_latents: Array, t: Array,
                  text_emb: Array) -> Array:
  """The UNet's noise prediction eps(z_t; y, t), converted from v if the model predicts v.

  Args:
    params: the guidance params (uses "unet" and "alphas_cumprod").
    noisy_latents: (N, h, w, C). t: (N,) int32. text_emb: (N, L, D).

  Returns:
    (N, h, w, C) float32.
  """
  return unet_epsilon(guidance, params, noisy_latents, noisy_latents, t, text_emb)


def unet_epsilon(guidance, params: Params, unet_input: Array, noisy_latents: Array, t: Array,
                 context: Array) -> Array:
  """eps from the UNet run on `unet_input` (N, h, w, C') (the noisy latents, or
  Zero-1-to-3's noisy latents beside the input image's), cross-attending to `context`
  (N, L, D); a v prediction is converted with `noisy_latents` (N, h, w, C).
  Returns (N, h, w, C) float32."""
  x = jnp.transpose(unet_input, (0, 3, 1, 2)).astype(guidance.dtype)  # the UNet takes NCHW
  t = jnp.asarray(t, jnp.int32)  # diffusers wraps anything but a jax array into a 2-d array
  out = guidance.unet.apply({"params": params["unet"]}, x, t, context.astype(guidance.dtype)).sample
  out = jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)
  if guidance.prediction_type == "v_prediction":
    out = diffusion.epsilon_from_v(params["alphas_cumprod"], out, noisy_latents.astype(jnp.float32), t)
  return out


def predict_noise_per_embedding(guidance: StableDiffusionGuidance, params: Params, noisy_latents: Array, t: Array,
                                embeddings: Sequence[Array]) -> list[Array]:
  """The prediction of the same noisy latents under each of K embeddings, from ONE
  UNet call on a batch of K B; a list of K (B, h, w, C) float32 arrays."""
  k, b = len(embeddings), noisy_latents.shape[0]
  eps = predict_noise(guidance, params, jnp.concatenate([noisy_latents] * k), jnp.concatenate([t] * k),
                      jnp.concatenate(list(embeddings)))
  return [eps[i * b:(i + 1) * b] for i in range(k)]


# ----------------------------------------------------------------------------- assembling a checkpoint
# (its files: pipeline_dir.py; its Flax modules: sd_models.py)


def check_sizes(settings: SDSSettings, unet_config: Mapping[str, Any], vae_downsample: int) -> None:
  unet_downsample = 2 ** (len(unet_config.get("block_out_channels", (0,) * 4)) - 1)
  if settings.image_size % (vae_downsample * unet_downsample):
    raise ValueError(f"guidance.image_size={settings.image_size} must be a multiple of "
                     f"{vae_downsample * unet_downsample} (VAE downsampling {vae_downsample} x UNet "
                     f"downsampling {unet_downsample}), e.g. 512 for Stable Diffusion")


def load_stable_diffusion(
    model: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    settings: SDSSettings = SDSSettings(),
    local_files_only: bool = True,
    cache_dir: str | os.PathLike | None = None,
    device: jax.Device | jax.sharding.Sharding | None = None,
) -> tuple[StableDiffusionGuidance, dict[str, Any]]:
  """Loads a Stable Diffusion checkpoint for SDS. Checks everything before compiling.

  Args:
    model: a directory in the diffusers layout or a hub id in the HF cache.
    dtype: "float32" or "bfloat16" for the weights and the models' activations.
    settings: the SDS loss settings.
    local_files_only: resolve hub ids from the cache only (default); False may
      download the needed files.
    cache_dir: the HF cache to look in (default: HF_HOME's).
    device: where to put the params once (a Device or a Sharding, e.g. replicated
      over a mesh); default: jax's default device.

  Returns:
    (guidance, params): the static StableDiffusionGuidance and the params pytree
    {"unet", "vae", "text_encoder", "alphas_cumprod"} on the device.

  Raises:
    ModelNotFoundError: the checkpoint is not available locally.
    WeightMismatchError (a ValueError): weights do not fit their config.
    ValueError: bad dtype, settings, or sizes.
  """
  if dtype not in DTYPES:
    raise ValueError(f"guidance.dtype={dtype!r}; known: {tuple(DTYPES)}")
  jdtype = DTYPES[dtype]
  root = resolve_model_dir(model, local_files_only=local_files_only, cache_dir=cache_dir)
  if is_zero123(root):
    raise ModelNotFoundError(f"config.guidance.model={model!r} ({root}) is a Zero-1-to-3 checkpoint (it has "
                             "cc_projection/), not a text-to-image model: image-to-3D takes --config.image=PATH with "
                             "config.guidance.prior='zero123' (configs/zero123.py)")

  unet_config = read_json(root / "unet" / "config.json")
  pixel_space = is_pixel_space(root)
  # A pixel-space model's "latents" are the images in [-1, 1]: no VAE, no scaling.
  vae_config = ({"block_out_channels": (0,), "latent_channels": unet_config.get("in_channels", 3),
                 "scaling_factor": 1.0} if pixel_space else read_json(root / "vae" / "config.json"))
  vae_downsample = 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)
  check_sizes(settings, unet_config, vae_downsample)
  alphas_cumprod, prediction_type = diffusion.read_scheduler(
      read_json(root / "scheduler" / "scheduler_config.json"), f"{root}/scheduler")

  unet, unet_shapes = unet_from_config(unet_config, jdtype)
  vae, vae_shapes = (None, {}) if pixel_space else vae_from_config(vae_config, jdtype)
  text_encoder, text_shapes = text_encoder_from_config(read_json(root / "text_encoder" / "config.json"), jdtype)
  tokenizer = load_tokenizer(root / "tokenizer")
  params = {
      "unet": load_params(root / "unet", DIFFUSERS_WEIGHTS, unet_shapes, jdtype),
      "vae": {} if pixel_space else load_params(root / "vae", DIFFUSERS_WEIGHTS, vae_shapes, jdtype),
      "text_encoder": load_params(root / "text_encoder", TRANSFORMERS_WEIGHTS, text_shapes, jdtype),
      # The schedule stays float32 even with bfloat16 weights: 1 - alpha_bar near t=0
      # would round to 0 in bfloat16.
      "alphas_cumprod": alphas_cumprod,
  }
  params = jax.device_put(params, device)
  guidance = StableDiffusionGuidance(
      model=model, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, settings=settings,
      dtype=jdtype, num_train_timesteps=len(alphas_cumprod), prediction_type=prediction_type,
      vae_scaling_factor=float(vae_config.get("scaling_factor", 0.18215)), vae_downsample=vae_downsample,
      latent_channels=int(vae_config.get("latent_channels", 4)))
  return guidance, params


def from_config(cfg, **kwargs) -> tuple[StableDiffusionGuidance, dict[str, Any]]:
  """load_stable_diffusion with the fields of `config.guidance` (see the module
  docstring); kwargs (cache_dir, device, local_files_only) pass through."""
  settings = settings_from_config(cfg)  # validate the settings before touching files
  return load_stable_diffusion(cfg.get("model", DEFAULT_MODEL), dtype=cfg.get("dtype", "float32"),
                               settings=settings, **kwargs)


# What this prior conditions on: a text prompt (runs.py builds its prompt embeddings).
CONDITIONS_ON = "text"

__all__ = [
    "CONDITIONS_ON", "DEFAULT_MODEL", "DTYPES", "ModelNotFoundError", "PromptEmbeddings", "SDSSettings",
    "StableDiffusionGuidance", "decode_latents", "encode_images", "from_config", "load_stable_diffusion",
    "make_prompt_embeddings", "predict_noise", "predict_noise_per_embedding", "resolve_model_dir",
    "select_embeddings", "settings_from_config", "text_encoder_from_config", "unet_from_config", "vae_from_config",
]
