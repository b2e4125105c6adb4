"""A tiny random Stable Diffusion in the diffusers layout, for tests and benchmarks.

No network and no torch: the configs below describe a UNet, VAE and CLIP text
encoder of a few hundred kilobytes; their weights are random, written either as
native Flax msgpack or as PyTorch-layout safetensors (through the inverse of the
loader's weight mapping). The directory loads through the real loading path:

    path = build_tiny_pipeline_dir(tmp_dir, fmt="safetensors")
    guidance, params = load_stable_diffusion(str(path), settings=SDSSettings(image_size=TINY_IMAGE_SIZE))

Design constraints:
  * diffusers' Flax UNet hard-codes GroupNorm(32), while its PyTorch UNet honours
    norm_num_groups: the UNet channels are multiples of 32 with norm_num_groups=32
    so both agree (the parity tests compare them).
  * The weights are filled from the modules' `jax.eval_shape` param trees with
    numpy (sd_models.random_params), skipping the ~20 s compile of a Flax init on a
    small CPU.
  * The tokenizer is char_tokenizer.py's: a real CLIP BPE tokenizer over the 256
    byte symbols, without merges.

The writing itself is pipeline_dir.write_pipeline_dir (the embedded toy prior is
written by it too); this module only holds the tiny configs and defaults.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

from dreamfusion_jax.guidance import char_tokenizer, pipeline_dir, sd_models

TINY_IMAGE_SIZE = 32  # VAE input size; latents are TINY_IMAGE_SIZE / 2 = 16 pixels wide
TINY_MAX_LENGTH = 77  # tokens per prompt, as in Stable Diffusion

TINY_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,  # diffusers reads it as the number of heads
    "cross_attention_dim": 32,
    "use_linear_projection": True,  # as SD 2.x
    "norm_num_groups": 32,
}
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": TINY_IMAGE_SIZE,
    "scaling_factor": 0.18215,
}
TINY_SCHEDULER_CONFIG = {  # Stable Diffusion's DDPM schedule
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def tiny_text_encoder_config() -> dict[str, Any]:
  vocab_size = char_tokenizer.vocab_size()
  return {
      "architectures": ["CLIPTextModel"],
      "model_type": "clip_text_model",
      "vocab_size": vocab_size,
      "hidden_size": 32,
      "intermediate_size": 37,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "max_position_embeddings": TINY_MAX_LENGTH,
      "hidden_act": "gelu",  # as SD 2.x's OpenCLIP-H text tower
      "layer_norm_eps": 1e-5,
      "projection_dim": 32,
      "bos_token_id": vocab_size - 2,
      "eos_token_id": vocab_size - 1,
      "pad_token_id": vocab_size - 1,
  }


def tiny_params(seed: int = 0) -> dict[str, dict]:
  """Random params {"unet", "vae", "text_encoder"} (numpy) for the tiny configs."""
  _, unet_shapes = sd_models.unet_from_config(TINY_UNET_CONFIG)
  _, vae_shapes = sd_models.vae_from_config(TINY_VAE_CONFIG)
  _, text_shapes = sd_models.text_encoder_from_config(tiny_text_encoder_config())
  return {"unet": sd_models.random_params(unet_shapes, seed), "vae": sd_models.random_params(vae_shapes, seed + 1),
          "text_encoder": sd_models.random_params(text_shapes, seed + 2)}


def write_tokenizer(folder: str | os.PathLike, max_length: int = TINY_MAX_LENGTH) -> None:
  """The character-level CLIPTokenizer directory (char_tokenizer.py) at the tiny length."""
  char_tokenizer.write_tokenizer(folder, max_length=max_length)


def write_pipeline_dir(path: str | os.PathLike, params: Mapping[str, Mapping], *, fmt: str = "flax",
                       unet_config: Mapping = TINY_UNET_CONFIG, vae_config: Mapping | None = TINY_VAE_CONFIG,
                       text_encoder_config: Mapping | None = None,
                       scheduler_config: Mapping = TINY_SCHEDULER_CONFIG,
                       max_length: int = TINY_MAX_LENGTH) -> pathlib.Path:
  """pipeline_dir.write_pipeline_dir with the tiny configs as defaults."""
  return pipeline_dir.write_pipeline_dir(
      path, params, fmt=fmt, unet_config=unet_config, vae_config=vae_config,
      text_encoder_config=text_encoder_config or tiny_text_encoder_config(), scheduler_config=scheduler_config,
      max_length=max_length)


def build_tiny_pipeline_dir(path: str | pathlib.Path, *, fmt: str = "flax", seed: int = 0) -> pathlib.Path:
  """A tiny random Stable Diffusion directory (see the module docstring); seconds to build."""
  return write_pipeline_dir(path, tiny_params(seed), fmt=fmt)
