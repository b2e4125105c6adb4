"""Classifier Score Distillation (Yu et al. 2023, "Text-to-3D with Classifier Score
Distillation"): the SDS gradient without its noise residual.

SDS's residual eps_hat - eps = (eps_u - eps) + s (eps_c - eps_u) is a denoising term
plus the classifier term; CSD keeps the classifier term alone,

    residual = s (eps(z_t; y, t) - eps(z_t; empty, t)),

s the guidance scale (the paper's w; with s = 1 it is the classifier score itself, up
to the -1/sigma_t factor that w(t) absorbs). The negative prompt, where one is set, is
the "empty" side here as in SDS, so this is the paper's variant with a negative prompt
and equal weights. With Perp-Neg or Zero-1-to-3 the direction is the conditioning's
own (conditioning.py). One batched model call, as SDS.
"""

from __future__ import annotations

import jax

from dreamfusion_jax.guidance import conditioning, diffusion
from dreamfusion_jax.guidance.methods._stateless import extra_losses, init_state, state_learning_rate

Array = jax.Array


def residual(prior, params, latents: Array, cond, t: Array, noise: Array, *, scale, settings, state=None,
             c2w=None) -> Array:
  """s (eps_c(z_t) - eps_u(z_t)): (B, h, w, C) float32 (see methods/__init__.py)."""
  del settings, state, c2w
  noisy = diffusion.add_noise(params["alphas_cumprod"], latents, noise, t)
  _, direction = conditioning.guidance_direction(prior, params, noisy, t, cond)
  return scale * direction


__all__ = ["extra_losses", "init_state", "residual", "state_learning_rate"]
