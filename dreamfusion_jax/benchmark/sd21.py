"""SD-2.1-base's shapes: its UNet, VAE and text encoder configs, and a guidance with
those shapes and random weights, to benchmark an accelerator at full size with
nothing downloaded."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp

from dreamfusion_jax.guidance import char_tokenizer, sd_models, diffusion
from dreamfusion_jax.guidance.priors import stable_diffusion as sd

# stabilityai/stable-diffusion-2-1-base, from its unet/, vae/ and text_encoder/ config.json.
SD21_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD21_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD21_TEXT_ENCODER_CONFIG = {  # OpenCLIP ViT-H/14's text tower minus its last layer
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
SD21_SCHEDULER_CONFIG = {  # its scheduler/scheduler_config.json: the scaled-linear DDPM schedule
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def sd21_shaped_guidance(settings, *, dtype: str = "float32", seed: int = 0):
  """A StableDiffusionGuidance with SD-2.1-base's shapes and random weights: benchmark
  an accelerator at full size with nothing downloaded. The tokenizer is the
  character-level one (char_tokenizer.py: its ids fit the 49408-token vocabulary, and
  the cost does not depend on them); weights from sd_models.random_params.

  Returns:
    (guidance, params) as `load_stable_diffusion` returns them.
  """
  if settings.image_size % 64:
    raise ValueError(f"SD-2.1-base shapes need image_size a multiple of 64 (VAE x UNet downsampling); "
                     f"got {settings.image_size}")
  jdtype = sd_models.DTYPES[dtype]
  unet, unet_shapes = sd_models.unet_from_config(SD21_UNET_CONFIG, jdtype)
  vae, vae_shapes = sd_models.vae_from_config(SD21_VAE_CONFIG, jdtype)
  text_encoder, text_shapes = sd_models.text_encoder_from_config(SD21_TEXT_ENCODER_CONFIG, jdtype)
  with tempfile.TemporaryDirectory() as d:
    char_tokenizer.write_tokenizer(d, max_length=SD21_TEXT_ENCODER_CONFIG["max_position_embeddings"])
    tokenizer = sd_models.load_tokenizer(d)
  sched = SD21_SCHEDULER_CONFIG
  alphas_cumprod = diffusion.ddpm_alphas_cumprod(beta_start=sched["beta_start"], beta_end=sched["beta_end"],
                                           beta_schedule=sched["beta_schedule"],
                                           num_train_timesteps=sched["num_train_timesteps"])
  device = jax.local_devices()[0]
  params = {"unet": sd_models.random_params(unet_shapes, seed, jdtype, device),
            "vae": sd_models.random_params(vae_shapes, seed + 1, jdtype, device),
            "text_encoder": sd_models.random_params(text_shapes, seed + 2, jdtype, device),
            "alphas_cumprod": jnp.asarray(alphas_cumprod)}
  guidance = sd.StableDiffusionGuidance(
      model="SD-2.1-base shapes, random weights", unet=unet, vae=vae, text_encoder=text_encoder,
      tokenizer=tokenizer, settings=settings, dtype=jdtype, num_train_timesteps=len(alphas_cumprod),
      prediction_type=SD21_SCHEDULER_CONFIG["prediction_type"], vae_scaling_factor=SD21_VAE_CONFIG["scaling_factor"], vae_downsample=8,
      latent_channels=4)
  return guidance, params
