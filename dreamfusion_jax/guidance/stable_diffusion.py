"""Stable Diffusion (Flax, frozen) as the 2D prior of Score Distillation Sampling.

The guidance itself: its settings (`SDSSettings`), the static `StableDiffusionGuidance`
assembled from a checkpoint (`load_stable_diffusion`, `from_config`), and `sds.py`'s
math wired to the models: encode images, predict noise, classifier-free guidance,
`sds_loss`, `ddim_sample`. Finding and reading the checkpoint directory (diffusers
layout) is pipeline_dir.py's; building the Flax modules from their configs,
sd_models.py's (which imports diffusers and transformers).

Usage in a training step (params are arguments, the guidance object is static):

    guidance, gparams = from_config(config.guidance)        # or load_stable_diffusion(...)
    prompts = make_prompt_embeddings(guidance, gparams, config.prompt,
                                     config.guidance.negative_prompt,
                                     config.guidance.view_dependent)
    def step(guidance, state, gparams, prompts, key, t_range):
      cond, uncond = select_embeddings(prompts, buckets)   # buckets: (B,) int32
      loss, metrics = guidance.loss(gparams, images, cond, uncond, key, t_range=t_range)
    step = jax.jit(functools.partial(step, guidance))

Config fields (`config.guidance`, read by `from_config`; defaults in brackets):
  model            hub id (resolved from the local HF cache only) or a directory in
                   the diffusers layout ["stabilityai/stable-diffusion-2-1-base"].
  dtype            "float32" or "bfloat16": frozen weights and UNet/VAE/CLIP
                   activations ["float32"]. The noise schedule and SDS math stay float32.
  guidance_scale   classifier-free guidance scale s [100.0].
  t_min, t_max     timestep range as fractions of the training timesteps [0.02, 0.98];
                   the defaults of `loss` when no t_range is passed.
  weighting        w(t): "sds" (1 - alpha_bar), "uniform", "fantasia3d" ["sds"].
  grad_clip        elementwise clip of the latent SDS gradient; 0 or None: off [None].
  image_size       VAE input size; renders are resized (bilinear) to it [512].
  sample_posterior encode to a sample of the VAE posterior instead of its mean [False].
  method           the member of the SDS family: "sds", "csd" (guidance/csd.py), "ism"
                   (guidance/ism.py), "vsd" (guidance/vsd.py: trains a LoRA alongside
                   the scene, see `init_trainable`) ["sds"].
  ism_delta_t      ISM's interval t - s in training timesteps [50].
  ism_inv_steps    ISM's DDIM inversion steps from the clean latents to x_s [5].
  vsd_lora_rank    the rank r of VSD's LoRA [4].
  negative_prompt  the unconditional prompt [""] (used by make_prompt_embeddings).
  view_dependent   append ", front view" etc. per view bucket [True] (ditto).
Other fields of the section (e.g. an annealing schedule of t_max) are ignored here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamfusion_jax.guidance import sds
from dreamfusion_jax.guidance.pipeline_dir import (DEFAULT_MODEL, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS,
                                                   ModelNotFoundError, is_pixel_space, is_zero123, load_params, read_json,
                                                   resolve_model_dir)
from dreamfusion_jax.guidance.prompts import PromptEmbeddings, make_prompt_embeddings, select_embeddings
from dreamfusion_jax.guidance.sd_models import (DTYPES, CLIPTokenizer, FlaxAutoencoderKL, FlaxCLIPTextModel,
                                                FlaxUNet2DConditionModel, load_tokenizer, text_encoder_from_config,
                                                unet_from_config, vae_from_config)

Array = jax.Array
Params = Mapping[str, Any]


# The SDS family: name -> the module (in this package) whose `residual` gives the
# method's gradient w(t) * residual on the latents; "sds" is `sds_residual` below.
METHODS = sds.METHODS


@dataclasses.dataclass(frozen=True)
class SDSSettings:
  """Static settings of the SDS loss (changing one recompiles). See the module docstring."""

  guidance_scale: float = 100.0
  weighting: str = "sds"
  grad_clip: float | None = None
  image_size: int = 512
  sample_posterior: bool = False
  t_min: float = 0.02
  t_max: float = 0.98
  method: str = "sds"
  ism_delta_t: int = 50
  ism_inv_steps: int = 5
  vsd_lora_rank: int = 4

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"guidance.method={self.method!r}; known: {METHODS}")
    if self.ism_delta_t < 0 or self.ism_inv_steps < 1:
      raise ValueError(f"need guidance.ism_delta_t >= 0 and guidance.ism_inv_steps >= 1, got {self.ism_delta_t}, "
                       f"{self.ism_inv_steps}")
    if self.vsd_lora_rank < 1:
      raise ValueError(f"guidance.vsd_lora_rank={self.vsd_lora_rank} must be >= 1")
    if self.weighting not in sds.WEIGHTINGS:
      raise ValueError(f"guidance.weighting={self.weighting!r}; known: {sds.WEIGHTINGS}")
    if not 0.0 <= self.t_min <= self.t_max <= 1.0:
      raise ValueError(f"need 0 <= guidance.t_min <= guidance.t_max <= 1, got {self.t_min}, {self.t_max}")
    if self.grad_clip is not None and self.grad_clip < 0:
      raise ValueError(f"guidance.grad_clip={self.grad_clip} must be >= 0 (0 or None: off)")
    if self.image_size <= 0:
      raise ValueError(f"guidance.image_size={self.image_size} must be positive")


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

  def loss(self, params: Params, images: Array, cond_emb: Array, uncond_emb: Array, key: Array,
           t_range: Array | None = None, guidance_scale: Array | None = None, *, trainable: Any = None,
           c2w: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """SDS surrogate loss of rendered images; see `sds_loss`."""
    return sds_loss(params, images, cond_emb, uncond_emb, key, t_range, guidance=self, guidance_scale=guidance_scale,
                    trainable=trainable, c2w=c2w)

  def init_trainable(self, params: Params, key: Array) -> Any:
    """The method's own trainable parameters, trained with the scene by the same
    gradient (passed back to `loss` as `trainable`): VSD's LoRA, None otherwise."""
    if self.settings.method != "vsd":
      return None
    from dreamfusion_jax.guidance import vsd  # pylint: disable=g-import-not-at-top

    return vsd.init(key, params["unet"], self.settings.vsd_lora_rank)

  def encode_prompts(self, params: Params, prompts: Sequence[str]) -> Array:
    """Text embeddings (N, L, D) float32 of N prompts (L = tokenizer max length, 77)."""
    # Some tokenizer configs leave model_max_length at a huge sentinel value.
    length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
    ids = self.tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="np").input_ids
    return _encode_token_ids(self, params["text_encoder"], jnp.asarray(ids, jnp.int32))

  def encode_images(self, params: Params, images: Array, key: Array | None = None) -> Array:
    """See `encode_images`."""
    return encode_images(self, params["vae"], images, key)

  def decode_latents(self, params: Params, latents: Array) -> Array:
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
    out = sds.epsilon_from_v(params["alphas_cumprod"], out, noisy_latents.astype(jnp.float32), t)
  return out


def guided_noise(guidance: StableDiffusionGuidance, params: Params, noisy_latents: Array, t: Array,
                 cond_emb: Array, uncond_emb: Array, guidance_scale: Array | None = None) -> Array:
  """Classifier-free-guided eps_hat from ONE UNet call on the doubled batch.

  Args:
    noisy_latents: (B, h, w, C). t: (B,) int32. cond_emb, uncond_emb: (B, L, D).
    guidance_scale: a traced scalar s (a multi-scene job's per-scene value), or None:
      settings.guidance_scale.

  Returns:
    (B, h, w, C) float32 eps_u + s (eps_c - eps_u).
  """
  eps_u, direction = guidance_direction(guidance, params, noisy_latents, t, cond_emb, uncond_emb)
  scale = guidance.settings.guidance_scale if guidance_scale is None else guidance_scale
  return eps_u + scale * direction


def guidance_direction(guidance: StableDiffusionGuidance, params: Params, noisy_latents: Array, t: Array,
                       cond_emb: Array | dict, uncond_emb: Array) -> tuple[Array, Array]:
  """(eps_u, d) with eps_hat = eps_u + s d: d = eps_c - eps_u for a plain (B, L, D)
  `cond_emb`, or Perp-Neg's direction for its conditioning dict (perp_neg.py; one UNet
  call on 4B images: uncond, positive, two negatives)."""
  if not isinstance(cond_emb, dict):
    eps_u, eps_c = noise_pair(guidance, params, noisy_latents, t, cond_emb, uncond_emb)
    return eps_u, eps_c - eps_u
  from dreamfusion_jax.guidance import perp_neg  # pylint: disable=g-import-not-at-top

  neg = cond_emb["neg"]
  eps_u, eps_pos, eps_neg0, eps_neg1 = predict_noise_per_embedding(
      guidance, params, noisy_latents, t, [uncond_emb, cond_emb["pos"], neg[:, 0], neg[:, 1]])
  eps_neg = jnp.stack([eps_neg0, eps_neg1], axis=1)
  return eps_u, perp_neg.guidance_direction(eps_u, eps_pos, eps_neg, cond_emb["neg_weights"])


def noise_pair(guidance: StableDiffusionGuidance, params: Params, noisy_latents: Array, t: Array,
               cond_emb: Array, uncond_emb: Array) -> tuple[Array, Array]:
  """(eps_u, eps_c): the unconditional and conditional predictions from ONE UNet call
  on the doubled batch; each (B, h, w, C) float32."""
  eps_u, eps_c = predict_noise_per_embedding(guidance, params, noisy_latents, t, [uncond_emb, cond_emb])
  return eps_u, eps_c


def predict_noise_per_embedding(guidance: StableDiffusionGuidance, params: Params, noisy_latents: Array, t: Array,
                                embeddings: Sequence[Array]) -> list[Array]:
  """The prediction of the same noisy latents under each of K embeddings, from ONE
  UNet call on a batch of K B; a list of K (B, h, w, C) float32 arrays."""
  k, b = len(embeddings), noisy_latents.shape[0]
  eps = predict_noise(guidance, params, jnp.concatenate([noisy_latents] * k), jnp.concatenate([t] * k),
                      jnp.concatenate(list(embeddings)))
  return [eps[i * b:(i + 1) * b] for i in range(k)]


def ddim_sample(guidance: StableDiffusionGuidance, params: Params, cond_emb: Array, uncond_emb: Array,
                key: Array, *, num_steps: int = 20, guidance_scale: float = 3.0) -> Array:
  """Samples images from the model with classifier-free-guided DDIM (eta = 0).

  Pixel-space models clip each step's x0 prediction to the data range [-1, 1]; latent
  models (whose latents are unbounded) do not.

  Args:
    cond_emb, uncond_emb: (B, L, D) text embeddings.
    key: PRNG key of the initial noise.
    num_steps: DDIM steps, evenly spaced over the training timesteps.

  Returns:
    (B, H, W, 3) float32 images in [0, 1] (decoded by the VAE unless pixel space).
  """
  b = cond_emb.shape[0]
  size = guidance.latent_size
  x = jax.random.normal(key, (b, size, size, guidance.latent_channels), jnp.float32)
  clip_x0 = 1.0 if guidance.vae is None else None
  timesteps = jnp.asarray(np.linspace(guidance.num_train_timesteps - 1, 0, num_steps).round(), jnp.int32)
  t_prev = jnp.concatenate([timesteps[1:], jnp.array([-1], jnp.int32)])

  def step(x, ts):
    t, tp = ts
    tt = jnp.full((2 * b,), t, jnp.int32)
    eps = predict_noise(guidance, params, jnp.concatenate([x, x]), tt, jnp.concatenate([uncond_emb, cond_emb]))
    eps = sds.classifier_free_guidance(eps[:b], eps[b:], guidance_scale)
    return sds.ddim_step(params["alphas_cumprod"], x, eps, t, tp, clip_x0), None

  x, _ = jax.lax.scan(step, x, (timesteps, t_prev))
  return decode_latents(guidance, params["vae"], x)


def sds_residual(guidance: StableDiffusionGuidance, params: Params, latents: Array, cond_emb: Array,
                 uncond_emb: Array, t: Array, noise: Array, guidance_scale: Array | None = None) -> Array:
  """SDS (DreamFusion eq. 3): eps_hat(z_t; y, t) - eps, z_t the latents noised by `noise`.

  The signature of every method's `residual` (csd.py, ism.py): latents (B, h, w, C)
  (already stop-gradient), text embeddings (B, L, D), t (B,) int32, noise like the
  latents, guidance_scale as in `guided_noise`. Returns (B, h, w, C) float32.
  """
  noisy = sds.add_noise(params["alphas_cumprod"], latents, noise, t)
  return guided_noise(guidance, params, noisy, t, cond_emb, uncond_emb, guidance_scale) - noise


def latent_sds_loss(guidance: StableDiffusionGuidance, params: Params, latents: Array, cond_emb: Array,
                    uncond_emb: Array, t: Array, noise: Array, guidance_scale: Array | None = None, *,
                    trainable: Any = None, c2w: Array | None = None, lora_t: Array | None = None,
                    lora_noise: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """SDS surrogate loss of latents at given timesteps and noise (no randomness inside).

  d loss / d latents = w(t) residual / B, clipped per settings, where residual is the
  method's (settings.method; SDS: eps_hat(z_t) - noise). The UNet sees stop-gradient
  inputs: it is frozen and its Jacobian is skipped (DreamFusion eq. 3).

  Args:
    latents: (B, h, w, C) float32. cond_emb, uncond_emb: (B, L, D).
    t: (B,) int32 timesteps. noise: (B, h, w, C) the eps added.
    guidance_scale: see `guided_noise`.
    trainable, c2w, lora_t, lora_noise: VSD only (vsd.py): its LoRA (`init_trainable`),
      the views' (B, 3, 4) cameras, and the LoRA loss's own (B,) timesteps and noise.

  Returns:
    (loss, metrics): "sds_loss", "timestep" (mean t as a fraction of T),
    "sds_grad_norm" (mean per-image L2 norm of the latent gradient), "sds_weight" (mean w);
    VSD adds its LoRA's loss to the loss and as "vsd_lora_loss".
  """
  s = guidance.settings
  abar = params["alphas_cumprod"]
  residual_fn = sds_residual if s.method == "sds" else importlib.import_module(
      f"dreamfusion_jax.guidance.{s.method}").residual
  extra = {}
  if s.method == "vsd":
    if trainable is None or c2w is None or lora_t is None:
      raise ValueError("guidance.method=vsd needs its trainable LoRA, the cameras and the LoRA's draws")
    extra = {"trainable": jax.lax.stop_gradient(trainable), "c2w": c2w}
  residual = jax.lax.stop_gradient(residual_fn(guidance, params, jax.lax.stop_gradient(latents), cond_emb,
                                               uncond_emb, t, noise, guidance_scale, **extra))
  weight = sds.sds_weight(abar, t, s.weighting)
  grad = sds.weighted_gradient(residual, weight, s.grad_clip)
  loss = sds.sds_surrogate_loss(latents, grad)
  metrics = sds.loss_metrics(loss, t, grad, weight, guidance.num_train_timesteps)
  if s.method == "vsd":
    from dreamfusion_jax.guidance import vsd  # pylint: disable=g-import-not-at-top

    lora = vsd.lora_loss(guidance, params, trainable, latents, cond_emb, lora_t, lora_noise, c2w)
    loss = loss + lora
    metrics["vsd_lora_loss"] = lora
  return loss, metrics


def sds_loss(params: Params, images: Array, cond_emb: Array, uncond_emb: Array, key: Array,
             t_range: Array | None = None, *, guidance: StableDiffusionGuidance,
             guidance_scale: Array | None = None, trainable: Any = None,
             c2w: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """The SDS loss of a batch of renders: pure and jittable; jax.grad of it with respect
  to `images` is the SDS gradient pushed back through the VAE encoder.

  Steps: resize to image_size, map to [-1, 1], VAE-encode (mean of the posterior, or
  a sample), scale by the VAE scaling factor. Then t ~ U[t_min, t_max] T, noise,
  one UNet call on the CFG-doubled batch, w(t) (eps_hat - eps) as the gradient.

  Args:
    params: the guidance params (frozen; an argument so the weights are not baked
      into the compiled step).
    images: (B, H, W, 3) float32 in [0, 1].
    cond_emb, uncond_emb: (B, L, D) text embeddings (prompts.select_embeddings).
    key: PRNG key for t, the noise and the posterior sample; or (B, 2) keys, one per
      image, so that an image's draws do not depend on the batch (the train step's
      device-count independence needs this).
    t_range: (2,) float32 [t_min, t_max] as fractions of T, traced (anneal it without
      recompiling); None: the settings' t_min, t_max.
    guidance: the static StableDiffusionGuidance.
    guidance_scale: see `guided_noise`.
    trainable, c2w: VSD's LoRA and the views' (B, 3, 4) cameras; see `latent_sds_loss`.
      Its LoRA loss draws t' ~ U{0..T-1} and its noise from fold_in(noise key, 1).

  Returns:
    (scalar loss, metrics dict of scalars); see `latent_sds_loss`.
  """
  s = guidance.settings
  if t_range is None:
    t_range = jnp.array([s.t_min, s.t_max], jnp.float32)
  per_image = jnp.ndim(key) == 2
  k_t, k_noise, k_posterior = sds.split_draw_keys(key)
  latents = encode_images(guidance, params["vae"], images, k_posterior)
  b = latents.shape[0]
  t, noise = sds.sample_timesteps_and_noise(k_t, k_noise, latents.shape, t_range, guidance.num_train_timesteps)
  lora_draws = {}
  if s.method == "vsd":
    t_count = guidance.num_train_timesteps

    def draw(k):  # one image's (t', noise') for the LoRA's loss, from its own noise key
      k_t2, k_n2 = jax.random.split(jax.random.fold_in(k, 1))
      return (jax.random.randint(k_t2, (), 0, t_count, dtype=jnp.int32),
              jax.random.normal(k_n2, latents.shape[1:], jnp.float32))

    keys = k_noise if per_image else jax.random.split(k_noise, b)
    lora_t, lora_noise = jax.vmap(draw)(keys)
    lora_draws = {"trainable": trainable, "c2w": c2w, "lora_t": lora_t, "lora_noise": lora_noise}
  return latent_sds_loss(guidance, params, latents, cond_emb, uncond_emb, t, noise, guidance_scale, **lora_draws)


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

  unet_config = read_json(root / "unet" / "config.json")
  pixel_space = is_pixel_space(root)
  # A pixel-space model's "latents" are the images in [-1, 1]: no VAE, no scaling.
  vae_config = ({"block_out_channels": (0,), "latent_channels": unet_config.get("in_channels", 3),
                 "scaling_factor": 1.0} if pixel_space else read_json(root / "vae" / "config.json"))
  scheduler = read_json(root / "scheduler" / "scheduler_config.json")
  vae_downsample = 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)
  check_sizes(settings, unet_config, vae_downsample)
  prediction_type = scheduler.get("prediction_type", "epsilon")
  if prediction_type not in ("epsilon", "v_prediction"):
    raise ValueError(f"{root}/scheduler: prediction_type {prediction_type!r} is not supported")
  alphas_cumprod = sds.ddpm_alphas_cumprod(
      beta_start=scheduler.get("beta_start", 0.0001), beta_end=scheduler.get("beta_end", 0.02),
      beta_schedule=scheduler.get("beta_schedule", "linear"),
      num_train_timesteps=scheduler.get("num_train_timesteps", 1000))

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


def settings_from_config(cfg) -> SDSSettings:
  """SDSSettings from a `config.guidance` ConfigDict (missing fields: defaults)."""
  d = SDSSettings()
  grad_clip = cfg.get("grad_clip", d.grad_clip)
  return SDSSettings(
      guidance_scale=float(cfg.get("guidance_scale", d.guidance_scale)),
      weighting=cfg.get("weighting", d.weighting),
      grad_clip=float(grad_clip) if grad_clip else None,
      image_size=int(cfg.get("image_size", d.image_size)),
      sample_posterior=bool(cfg.get("sample_posterior", d.sample_posterior)),
      t_min=float(cfg.get("t_min", d.t_min)),
      t_max=float(cfg.get("t_max", d.t_max)),
      method=str(cfg.get("method", d.method)),
      ism_delta_t=int(cfg.get("ism_delta_t", d.ism_delta_t)),
      ism_inv_steps=int(cfg.get("ism_inv_steps", d.ism_inv_steps)),
      vsd_lora_rank=int(cfg.get("vsd_lora_rank", d.vsd_lora_rank)),
  )


def from_config(cfg, **kwargs) -> tuple[Any, dict[str, Any]]:
  """load_stable_diffusion with the fields of `config.guidance` (see the module
  docstring); kwargs (cache_dir, device, local_files_only) pass through. A
  Zero-1-to-3 directory (its cc_projection/) loads as guidance/zero123.py's guidance."""
  settings = settings_from_config(cfg)  # validate the settings before touching files
  root = resolve_model_dir(cfg.get("model", DEFAULT_MODEL), local_files_only=kwargs.get("local_files_only", True),
                           cache_dir=kwargs.get("cache_dir"))
  if is_zero123(root):
    from dreamfusion_jax.guidance import zero123  # pylint: disable=g-import-not-at-top

    return zero123.from_config(cfg, **kwargs)
  return load_stable_diffusion(cfg.get("model", DEFAULT_MODEL), dtype=cfg.get("dtype", "float32"),
                               settings=settings, **kwargs)


__all__ = [
    "DEFAULT_MODEL", "DTYPES", "ModelNotFoundError", "PromptEmbeddings", "SDSSettings", "StableDiffusionGuidance",
    "decode_latents", "encode_images", "from_config", "guided_noise", "latent_sds_loss",
    "load_stable_diffusion", "make_prompt_embeddings", "predict_noise", "resolve_model_dir", "sds_loss",
    "select_embeddings", "settings_from_config", "text_encoder_from_config", "unet_from_config",
    "vae_from_config",
]
