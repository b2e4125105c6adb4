"""Interval Score Matching (LucidDreamer, Liang et al. 2024).

SDS compares the guided prediction at z_t with the random noise that made z_t, a
one-step, high-variance target. ISM reaches z_t deterministically instead, by DDIM
inversion with the unconditional model, and compares against the prediction one
interval earlier:

    z_0 = the latents; DDIM-invert z_0 -> z_s in `ism_inv_steps` steps with eps(.; empty),
    s = max(t - ism_delta_t, 0); one more DDIM step z_s -> z_t with eps_s = eps(z_s; empty, s);
    residual = eps_hat(z_t; y, t) - eps_s            (eps_hat: guided)

and the gradient is w(t) residual as for every method. LucidDreamer's defaults: an
interval of 50 timesteps and 5 inversion steps of 200 (`xs_delta_t`) from timestep 0,
clamped; here the 5 steps split [0, s] evenly (static shapes, the same end point). The
inversion is deterministic (DDIM eta = 0): `noise` is not used. Cost: ism_inv_steps + 1
unconditional model calls plus SDS's batched one. "Unconditional" is the
conditioning's own (the empty prompt; Zero-1-to-3's zeroed input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamfusion_jax.guidance import conditioning, diffusion
from dreamfusion_jax.guidance.methods._stateless import extra_losses, init_state, state_learning_rate

Array = jax.Array


def residual(prior, params, latents: Array, cond, t: Array, noise: Array, *, scale, settings, state=None,
             c2w=None) -> Array:
  """eps_hat(z_t; y, t) - eps(z_s; empty, s) with z_t from DDIM inversion: (B, h, w, C)
  float32 (see methods/__init__.py)."""
  del noise, state, c2w  # the inversion is deterministic
  table = params["alphas_cumprod"]
  t = jnp.asarray(t, jnp.int32)
  s = jnp.maximum(t - settings.ism_delta_t, 0)
  n = settings.ism_inv_steps
  uncond = cond.unconditional()

  def predict_uncond(x, timesteps):
    return prior.noise_predictions(params, x, timesteps, [uncond])[0]

  def abar(step):  # step -1: the clean latents
    return jnp.where(step < 0, 1.0, table[jnp.maximum(step, 0)])

  def invert(i, x):
    t_from = jnp.where(i == 0, -1, (i * s) // n)
    t_to = ((i + 1) * s) // n
    return diffusion.ddim_move(abar(t_from), abar(t_to), x, predict_uncond(x, jnp.maximum(t_from, 0)))

  z_s = jax.lax.fori_loop(0, n, invert, latents.astype(jnp.float32))
  eps_s = predict_uncond(z_s, s)
  z_t = diffusion.ddim_move(abar(s), abar(t), z_s, eps_s)
  return conditioning.guided_noise(prior, params, z_t, t, cond, scale) - eps_s


__all__ = ["extra_losses", "init_state", "residual", "state_learning_rate"]
