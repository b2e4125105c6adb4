"""2D priors for score distillation.

  sds.py               the SDS math on arrays (noise, CFG, w(t), surrogate loss).
  prompts.py           view-dependent prompts, PromptEmbeddings, select_embeddings.
  stable_diffusion.py  a frozen Flax Stable Diffusion behind `loss` / `encode_prompts`.
  weight_conversion.py PyTorch-layout safetensors <-> Flax param trees (numpy only).
  tiny.py              a tiny random Stable Diffusion directory for tests/benchmarks.

The Stable Diffusion names are imported on first use: importing diffusers and
transformers takes seconds, which the pure math and other priors need not pay.
"""

import importlib

from dreamfusion_jax.guidance.prompts import (PromptEmbeddings, VIEW_SUFFIXES, make_prompt_embeddings,
                                              select_embeddings, view_prompts)
from dreamfusion_jax.guidance.sds import (add_noise, classifier_free_guidance, sample_timesteps,
                                          sds_gradient, sds_surrogate_loss, sds_weight)

_STABLE_DIFFUSION_NAMES = ("DEFAULT_MODEL", "ModelNotFoundError", "SDSSettings", "StableDiffusionGuidance",
                           "from_config", "load_stable_diffusion", "sds_loss")


def __getattr__(name):
  if name in _STABLE_DIFFUSION_NAMES:
    return getattr(importlib.import_module("dreamfusion_jax.guidance.stable_diffusion"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PromptEmbeddings", "VIEW_SUFFIXES", "add_noise", "classifier_free_guidance", "make_prompt_embeddings",
    "sample_timesteps", "sds_gradient", "sds_surrogate_loss", "sds_weight", "select_embeddings",
    "view_prompts", *_STABLE_DIFFUSION_NAMES,
]
