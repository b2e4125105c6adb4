"""Stable Diffusion (Flax, frozen) as the 2D prior of Score Distillation Sampling.

The only module of the repo that imports diffusers and transformers. It loads a
checkpoint in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/,
scheduler/) into their Flax classes and wires `sds.py`'s math to the models.

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
  negative_prompt  the unconditional prompt [""] (used by make_prompt_embeddings).
  view_dependent   append ", front view" etc. per view bucket [True] (ditto).
Other fields of the section (e.g. an annealing schedule of t_max) are ignored here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Mapping, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from dreamfusion_jax.guidance import sds
from dreamfusion_jax.guidance import weight_conversion
from dreamfusion_jax.guidance.prompts import PromptEmbeddings, make_prompt_embeddings, select_embeddings


class _DropFlaxDeprecation(logging.Filter):
  """diffusers 0.3x / transformers 4.x log "Flax classes are deprecated" from every
  Flax module's setup(), i.e. dozens of times per trace. We pin both below the
  versions that drop Flax (setup.py), so the message carries no news for us."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "classes are deprecated" not in record.getMessage()


def _silence_flax_deprecations() -> None:
  import diffusers.utils.logging  # pylint: disable=g-import-not-at-top
  import transformers.utils.logging  # pylint: disable=g-import-not-at-top

  drop = _DropFlaxDeprecation()
  for lib in (diffusers.utils.logging, transformers.utils.logging):
    root = lib.get_logger()  # the library's root logger; children propagate to its handlers
    root.addFilter(drop)
    for handler in root.handlers:
      handler.addFilter(drop)


with warnings.catch_warnings():
  warnings.simplefilter("ignore", FutureWarning)
  warnings.simplefilter("ignore", DeprecationWarning)
  _silence_flax_deprecations()
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top

Array = jax.Array
Params = Mapping[str, Any]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Weight files we can read, in order of preference, per component kind.
_DIFFUSERS_WEIGHTS = ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors",
                      "diffusion_pytorch_model.safetensors.index.json",
                      "diffusion_pytorch_model.fp16.safetensors")
_TRANSFORMERS_WEIGHTS = ("flax_model.msgpack", "model.safetensors", "model.safetensors.index.json",
                         "model.fp16.safetensors")
_LAYOUT = {
    "unet": (("config.json",), _DIFFUSERS_WEIGHTS),
    "vae": (("config.json",), _DIFFUSERS_WEIGHTS),
    "text_encoder": (("config.json",), _TRANSFORMERS_WEIGHTS),
    "tokenizer": (("vocab.json", "merges.txt"), ()),
    "scheduler": (("scheduler_config.json",), ()),
}
_HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*",
                 "*/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]


class ModelNotFoundError(FileNotFoundError):
  """The Stable Diffusion checkpoint is not on this machine (nothing is downloaded)."""


def _not_found(model: str, reason: str) -> ModelNotFoundError:
  return ModelNotFoundError(
      f"Stable Diffusion model {model!r} is not available: {reason}.\n"
      "Provide it in one of these ways:\n"
      f"  * download it (on a machine with network access):\n"
      f"      huggingface-cli download {model if model.count('/') == 1 else DEFAULT_MODEL} "
      "--include 'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*' --local-dir DIR\n"
      "    and run with --config.guidance.model=DIR (a local directory in the diffusers layout:\n"
      "    unet/, vae/, text_encoder/, tokenizer/, scheduler/);\n"
      "  * or put the hub snapshot in the Hugging Face cache (HF_HOME) and pass its hub id;\n"
      "  * or train against the embedded toy prior: --config=configs/toy.py.")


def _looks_like_hub_id(model: str) -> bool:
  parts = model.split("/")
  return (len(parts) == 2 and all(parts) and not model.startswith((".", "~"))
          and not os.path.isabs(model))


def is_pixel_space(root: pathlib.Path) -> bool:
  """A pixel-space diffusion model (like the embedded toy prior, or Imagen's base
  model): its model_index.json lists no VAE, and the UNet denoises RGB directly."""
  index = root / "model_index.json"
  return index.is_file() and "vae" not in _read_json(index)


def _missing_files(root: pathlib.Path) -> list[str]:
  missing = []
  pixel_space = is_pixel_space(root)
  for folder, (required, weights) in _LAYOUT.items():
    if folder == "vae" and pixel_space:
      continue
    for name in required:
      if not (root / folder / name).is_file():
        missing.append(f"{folder}/{name}")
    if weights and not any((root / folder / w).is_file() for w in weights):
      missing.append(f"{folder}/{{{' | '.join(weights)}}}")
  return missing


def resolve_model_dir(model: str, *, local_files_only: bool = True,
                      cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The local directory of a checkpoint given as a directory or a hub id.

  A hub id is looked up in the Hugging Face cache only (`local_files_only`), so an
  offline machine fails at once instead of waiting on the network.

  Raises:
    ModelNotFoundError: no such directory, the id is not cached, or files are missing.
  """
  path = pathlib.Path(model).expanduser()
  if path.is_dir():
    root = path
  elif not _looks_like_hub_id(model):
    raise _not_found(model, f"there is no directory {str(path)!r}")
  else:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top

    try:
      root = pathlib.Path(huggingface_hub.snapshot_download(
          model, local_files_only=local_files_only, cache_dir=cache_dir,
          allow_patterns=None if local_files_only else _HUB_PATTERNS))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.HfHubHTTPError, hf_errors.HFValidationError,
            OSError, ValueError) as e:
      where = "the local Hugging Face cache" if local_files_only else "the hub"
      raise _not_found(model, f"it is not a local directory and not in {where} "
                       f"({type(e).__name__})") from None
  missing = _missing_files(root)
  if missing:
    raise _not_found(model, f"{root} lacks " + ", ".join(missing))
  return root


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

  def __post_init__(self):
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
           t_range: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """SDS surrogate loss of rendered images; see `sds_loss`."""
    return sds_loss(params, images, cond_emb, uncond_emb, key, t_range, guidance=self)

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
  x = jnp.transpose(noisy_latents, (0, 3, 1, 2)).astype(guidance.dtype)  # the UNet takes NCHW
  t = jnp.asarray(t, jnp.int32)  # diffusers wraps anything but a jax array into a 2-d array
  out = guidance.unet.apply({"params": params["unet"]}, x, t, text_emb.astype(guidance.dtype)).sample
  out = jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)
  if guidance.prediction_type == "v_prediction":
    out = sds.epsilon_from_v(params["alphas_cumprod"], out, noisy_latents.astype(jnp.float32), t)
  return out


def guided_noise(guidance: StableDiffusionGuidance, params: Params, noisy_latents: Array, t: Array,
                 cond_emb: Array, uncond_emb: Array) -> Array:
  """Classifier-free-guided eps_hat from ONE UNet call on the doubled batch.

  Args:
    noisy_latents: (B, h, w, C). t: (B,) int32. cond_emb, uncond_emb: (B, L, D).

  Returns:
    (B, h, w, C) float32 eps_u + s (eps_c - eps_u), s = settings.guidance_scale.
  """
  b = noisy_latents.shape[0]
  eps = predict_noise(guidance, params, jnp.concatenate([noisy_latents, noisy_latents]),
                      jnp.concatenate([t, t]), jnp.concatenate([uncond_emb, cond_emb]))
  return sds.classifier_free_guidance(eps[:b], eps[b:], guidance.settings.guidance_scale)


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


def latent_sds_loss(guidance: StableDiffusionGuidance, params: Params, latents: Array, cond_emb: Array,
                    uncond_emb: Array, t: Array, noise: Array) -> tuple[Array, dict[str, Array]]:
  """SDS surrogate loss of latents at given timesteps and noise (no randomness inside).

  d loss / d latents = w(t) (eps_hat(z_t) - noise) / B, clipped per settings. The UNet
  sees stop_gradient(z_t): it is frozen and its Jacobian is skipped (DreamFusion eq. 3).

  Args:
    latents: (B, h, w, C) float32. cond_emb, uncond_emb: (B, L, D).
    t: (B,) int32 timesteps. noise: (B, h, w, C) the eps added.

  Returns:
    (loss, metrics): "sds_loss", "timestep" (mean t as a fraction of T),
    "sds_grad_norm" (mean per-image L2 norm of the latent gradient), "sds_weight" (mean w).
  """
  s = guidance.settings
  abar = params["alphas_cumprod"]
  noisy = jax.lax.stop_gradient(sds.add_noise(abar, latents, noise, t))
  eps_hat = jax.lax.stop_gradient(guided_noise(guidance, params, noisy, t, cond_emb, uncond_emb))
  weight = sds.sds_weight(abar, t, s.weighting)
  grad = sds.sds_gradient(eps_hat, noise, weight, s.grad_clip)
  loss = sds.sds_surrogate_loss(latents, grad)
  metrics = {
      "sds_loss": loss,
      "timestep": jnp.mean(t.astype(jnp.float32)) / guidance.num_train_timesteps,
      "sds_grad_norm": jnp.mean(jnp.sqrt(jnp.sum(grad.reshape(grad.shape[0], -1) ** 2, axis=-1))),
      "sds_weight": jnp.mean(weight),
  }
  return loss, metrics


def sds_loss(params: Params, images: Array, cond_emb: Array, uncond_emb: Array, key: Array,
             t_range: Array | None = None, *, guidance: StableDiffusionGuidance
             ) -> tuple[Array, dict[str, Array]]:
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

  Returns:
    (scalar loss, metrics dict of scalars); see `latent_sds_loss`.
  """
  s = guidance.settings
  if t_range is None:
    t_range = jnp.array([s.t_min, s.t_max], jnp.float32)
  per_image = jnp.ndim(key) == 2
  if per_image:
    k_t, k_noise, k_posterior = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(key), 1, 0)
  else:
    k_t, k_noise, k_posterior = jax.random.split(key, 3)
  latents = encode_images(guidance, params["vae"], images, k_posterior)
  b = latents.shape[0]
  if per_image:
    # Each image's t and noise depend only on its own key, not on the batch it is in:
    # splitting a batch across devices then changes nothing.
    t = jax.vmap(lambda k: sds.sample_timesteps(k, 1, t_range[0], t_range[1], guidance.num_train_timesteps)[0])(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(k_noise)
  else:
    t = sds.sample_timesteps(k_t, b, t_range[0], t_range[1], guidance.num_train_timesteps)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
  return latent_sds_loss(guidance, params, latents, cond_emb, uncond_emb, t, noise)


# ----------------------------------------------------------------------------- loading


def _read_json(path: pathlib.Path) -> dict:
  with open(path) as f:
    return json.load(f)


def _read_weights(folder: pathlib.Path, candidates: Sequence[str]) -> tuple[str, Any, pathlib.Path]:
  """("flax", nested dict) or ("pytorch", flat state dict), from the first file present."""
  for name in candidates:
    path = folder / name
    if not path.is_file():
      continue
    if name.endswith(".msgpack"):
      return "flax", flax.serialization.msgpack_restore(path.read_bytes()), path
    if name.endswith(".index.json"):  # sharded safetensors
      shards = sorted(set(_read_json(path)["weight_map"].values()))
      state = {}
      for shard in shards:
        state.update(safetensors.numpy.load_file(folder / shard))
      return "pytorch", state, path
    return "pytorch", safetensors.numpy.load_file(path), path
  raise FileNotFoundError(f"none of {candidates} in {folder}")  # _missing_files checked already


def _to_dtype(tree, dtype) -> Any:
  """Floating leaves to `dtype`, in numpy: one transfer to the device afterwards."""

  def cast(a):
    a = np.asarray(a)
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

  return jax.tree.map(cast, tree)


def _load_params(folder: pathlib.Path, candidates: Sequence[str], shapes: Params, dtype) -> Params:
  """Weights of one component, checked against the param shapes of its module."""
  layout, tensors, path = _read_weights(folder, candidates)
  if layout == "flax":
    weight_conversion.check_tree_matches(tensors, shapes, name=str(path))
    params = tensors
  else:
    params = weight_conversion.pytorch_to_flax(tensors, shapes, name=str(path))
  return _to_dtype(params, dtype)


def _flax_fields(cls, config: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of a diffusers config that the Flax class takes. PyTorch configs
  carry more (act_fn, norm_eps, upcast_attention, ...) that the Flax classes do not
  implement; diffusers would log each one on every load."""
  names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "parent", "name"}
  return {k: v for k, v in config.items() if k in names}


# PyTorch UNet options that diffusers' Flax UNet does not read, with the values it
# silently assumes (it hard-codes GroupNorm(32 groups), for one). A checkpoint with
# other values would load and compute something else.
_FLAX_UNET_ASSUMES = {
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "class_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "mid_block_scale_factor": 1, "downsample_padding": 1, "dual_cross_attention": False,
}


def unet_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> tuple[FlaxUNet2DConditionModel, Params]:
  """The UNet module of a diffusers config and its param shapes (nothing computed)."""
  unsupported = {k: config[k] for k, v in _FLAX_UNET_ASSUMES.items() if config.get(k, v) != v}
  if unsupported:
    raise ValueError(f"diffusers' Flax UNet cannot run this UNet config: it implements "
                     f"{ {k: _FLAX_UNET_ASSUMES[k] for k in unsupported} }, the config has {unsupported}")
  unet = FlaxUNet2DConditionModel.from_config(_flax_fields(FlaxUNet2DConditionModel, config), dtype=dtype)
  return unet, jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))


def vae_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> tuple[FlaxAutoencoderKL, Params]:
  """The VAE module of a diffusers config and its param shapes."""
  vae = FlaxAutoencoderKL.from_config(_flax_fields(FlaxAutoencoderKL, config), dtype=dtype)
  return vae, jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))


def text_encoder_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> tuple[FlaxCLIPTextModel, Params]:
  """The CLIP text model of a transformers config and its param shapes."""
  cfg = CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
  model = FlaxCLIPTextModel(cfg, dtype=dtype, _do_init=False)
  return model, jax.eval_shape(lambda k: model.init_weights(k, (1, 1)), jax.random.PRNGKey(0))


def _check_sizes(settings: SDSSettings, unet_config: Mapping[str, Any], vae_downsample: int) -> None:
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

  unet_config = _read_json(root / "unet" / "config.json")
  pixel_space = is_pixel_space(root)
  # A pixel-space model's "latents" are the images in [-1, 1]: no VAE, no scaling.
  vae_config = ({"block_out_channels": (0,), "latent_channels": unet_config.get("in_channels", 3),
                 "scaling_factor": 1.0} if pixel_space else _read_json(root / "vae" / "config.json"))
  scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
  vae_downsample = 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)
  _check_sizes(settings, unet_config, vae_downsample)
  prediction_type = scheduler.get("prediction_type", "epsilon")
  if prediction_type not in ("epsilon", "v_prediction"):
    raise ValueError(f"{root}/scheduler: prediction_type {prediction_type!r} is not supported")
  alphas_cumprod = sds.ddpm_alphas_cumprod(
      beta_start=scheduler.get("beta_start", 0.0001), beta_end=scheduler.get("beta_end", 0.02),
      beta_schedule=scheduler.get("beta_schedule", "linear"),
      num_train_timesteps=scheduler.get("num_train_timesteps", 1000))

  unet, unet_shapes = unet_from_config(unet_config, jdtype)
  vae, vae_shapes = (None, {}) if pixel_space else vae_from_config(vae_config, jdtype)
  text_encoder, text_shapes = text_encoder_from_config(_read_json(root / "text_encoder" / "config.json"), jdtype)
  tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
  params = {
      "unet": _load_params(root / "unet", _DIFFUSERS_WEIGHTS, unet_shapes, jdtype),
      "vae": {} if pixel_space else _load_params(root / "vae", _DIFFUSERS_WEIGHTS, vae_shapes, jdtype),
      "text_encoder": _load_params(root / "text_encoder", _TRANSFORMERS_WEIGHTS, text_shapes, jdtype),
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
  )


def from_config(cfg, **kwargs) -> tuple[StableDiffusionGuidance, dict[str, Any]]:
  """load_stable_diffusion with the fields of `config.guidance` (see the module
  docstring); kwargs (cache_dir, device, local_files_only) pass through."""
  settings = settings_from_config(cfg)  # validate the settings before touching files
  return load_stable_diffusion(cfg.get("model", DEFAULT_MODEL), dtype=cfg.get("dtype", "float32"),
                               settings=settings, **kwargs)


__all__ = [
    "DEFAULT_MODEL", "ModelNotFoundError", "PromptEmbeddings", "SDSSettings", "StableDiffusionGuidance",
    "decode_latents", "encode_images", "from_config", "guided_noise", "latent_sds_loss",
    "load_stable_diffusion", "make_prompt_embeddings", "predict_noise", "resolve_model_dir", "sds_loss",
    "select_embeddings", "settings_from_config", "text_encoder_from_config", "unet_from_config",
    "vae_from_config",
]
