"""Classifier Score Distillation (Yu et al. 2023, "Text-to-3D with Classifier Score
Distillation"): the SDS gradient without its noise residual.

SDS's residual eps_hat - eps = (eps_u - eps) + s (eps_c - eps_u) is a denoising term
plus the classifier term; CSD keeps the classifier term alone,

    residual = s (eps(z_t; y, t) - eps(z_t; empty, t)),

s the guidance scale (the paper's w; with s = 1 it is the classifier score itself, up
to the -1/sigma_t factor that w(t) absorbs). The negative prompt, where one is set, is
the "empty" side here as in SDS (`make_prompt_embeddings`), so this is the paper's
variant with a negative prompt and equal weights. One UNet call on the doubled batch,
as SDS.
"""

from __future__ import annotations

import jax

from dreamfusion_jax.guidance import sds
from dreamfusion_jax.guidance import stable_diffusion as sd

Array = jax.Array


def residual(guidance, params, latents: Array, cond_emb: Array, uncond_emb: Array, t: Array, noise: Array,
             guidance_scale: Array | None = None) -> Array:
  """s (eps_c(z_t) - eps_u(z_t)): (B, h, w, C) float32; see stable_diffusion.sds_residual."""
  scale = guidance.settings.guidance_scale if guidance_scale is None else guidance_scale
  noisy = sds.add_noise(params["alphas_cumprod"], latents, noise, t)
  _, direction = sd.guidance_direction(guidance, params, noisy, t, cond_emb, uncond_emb)
  return scale * direction  # s (eps_c - eps_u), or Perp-Neg's direction with its conditioning
