"""Score Distillation Sampling (DreamFusion, Poole et al. 2022, eq. 3):

    residual = eps_hat(z_t; y, t) - eps,   z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps,

eps_hat the guided prediction (classifier-free guidance, or the conditioning's own
direction). The gradient w(t) residual skips the UNet's Jacobian (guidance/distill.py).
"""

from __future__ import annotations

import jax

from dreamfusion_jax.guidance import conditioning, diffusion
from dreamfusion_jax.guidance.methods._stateless import extra_losses, init_state, state_learning_rate

Array = jax.Array


def residual(prior, params, latents: Array, cond, t: Array, noise: Array, *, scale, settings, state=None,
             c2w=None) -> Array:
  """eps_hat(z_t) - eps: (B, h, w, C) float32 (see methods/__init__.py)."""
  del settings, state, c2w
  noisy = diffusion.add_noise(params["alphas_cumprod"], latents, noise, t)
  return conditioning.guided_noise(prior, params, noisy, t, cond, scale) - noise


__all__ = ["extra_losses", "init_state", "residual", "state_learning_rate"]
