"""2D priors for score distillation.

  sds.py               the SDS math on arrays (noise, CFG, w(t), surrogate loss).
  prompts.py           view-dependent prompts, PromptEmbeddings, select_embeddings.
  stable_diffusion.py  a frozen Flax Stable Diffusion as guidance: SDSSettings,
                       `loss` / `encode_prompts`, load_stable_diffusion, from_config.
  pipeline_dir.py      a checkpoint directory in the diffusers layout: find (dir or
                       cached hub id), check, read weights, write one.
  sd_models.py         the Flax UNet / VAE / CLIP text modules from their configs,
                       random weights for their shapes.
  char_tokenizer.py    a character-level CLIP tokenizer (the toy prior's vocabulary).
  weight_conversion.py PyTorch-layout safetensors <-> Flax param trees (numpy only).
  tiny.py              a tiny random Stable Diffusion directory for tests/benchmarks.

The Stable Diffusion names are imported on first use: importing diffusers and
transformers (sd_models.py) takes seconds, which the pure math and other priors need
not pay.
"""

import importlib

from dreamfusion_jax.guidance.prompts import (PromptEmbeddings, VIEW_SUFFIXES, make_prompt_embeddings,
                                              select_embeddings, view_prompts)
from dreamfusion_jax.guidance.sds import (add_noise, classifier_free_guidance, sample_timesteps,
                                          sds_gradient, sds_surrogate_loss, sds_weight)

# name -> the module that defines it (pipeline_dir.py imports no diffusers).
_LAZY_NAMES = {
    "DEFAULT_MODEL": "pipeline_dir",
    "ModelNotFoundError": "pipeline_dir",
    "SDSSettings": "stable_diffusion",
    "StableDiffusionGuidance": "stable_diffusion",
    "from_config": "stable_diffusion",
    "load_stable_diffusion": "stable_diffusion",
    "sds_loss": "stable_diffusion",
}


def __getattr__(name):
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(f"dreamfusion_jax.guidance.{_LAZY_NAMES[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PromptEmbeddings", "VIEW_SUFFIXES", "add_noise", "classifier_free_guidance", "make_prompt_embeddings",
    "sample_timesteps", "sds_gradient", "sds_surrogate_loss", "sds_weight", "select_embeddings",
    "view_prompts", *_LAZY_NAMES,
]
