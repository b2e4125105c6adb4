"""Interval Score Matching (LucidDreamer, Liang et al. 2024).

SDS compares the guided prediction at z_t with the random noise that made z_t, a
one-step, high-variance target. ISM reaches z_t deterministically instead, by DDIM
inversion with the unconditional model, and compares against the prediction one
interval earlier:

    z_0 = the latents; DDIM-invert z_0 -> z_s in `ism_inv_steps` steps with eps(.; empty),
    s = max(t - ism_delta_t, 0); one more DDIM step z_s -> z_t with eps_s = eps(z_s; empty, s);
    residual = eps_hat(z_t; y, t) - eps_s            (eps_hat: classifier-free guided)

and the gradient is w(t) residual as for every method. LucidDreamer's defaults: an
interval of 50 timesteps and 5 inversion steps of 200 (`xs_delta_t`) from timestep 0,
clamped; here the 5 steps split [0, s] evenly (static shapes, the same end point). The
inversion is deterministic (DDIM eta = 0): `noise` is not used. Cost: ism_inv_steps + 1
unconditional UNet calls plus SDS's doubled one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamfusion_jax.guidance import stable_diffusion as sd

Array = jax.Array


def ddim_move(abar_from: Array, abar_to: Array, x: Array, eps: Array) -> Array:
  """Deterministic DDIM (eta = 0) from noise level abar_from to abar_to:
  sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps, x0_hat = (x - sqrt(1 - abar_from) eps) / sqrt(abar_from).

  Args:
    abar_from, abar_to: (B,) alpha_bar of the two levels (1 for clean latents).
    x, eps: (B, h, w, C).
  """
  expand = lambda a: a.reshape((-1,) + (1,) * (x.ndim - 1))
  a_from, a_to = expand(abar_from), expand(abar_to)
  x0 = (x - jnp.sqrt(1.0 - a_from) * eps) / jnp.sqrt(a_from)
  return jnp.sqrt(a_to) * x0 + jnp.sqrt(1.0 - a_to) * eps


def residual(guidance, params, latents: Array, cond_emb: Array, uncond_emb: Array, t: Array, noise: Array,
             guidance_scale: Array | None = None) -> Array:
  """eps_hat(z_t; y, t) - eps(z_s; empty, s) with z_t from DDIM inversion: (B, h, w, C)
  float32; see stable_diffusion.sds_residual for the arguments."""
  del noise  # the inversion is deterministic
  settings = guidance.settings
  table = params["alphas_cumprod"]
  t = jnp.asarray(t, jnp.int32)
  s = jnp.maximum(t - settings.ism_delta_t, 0)
  n = settings.ism_inv_steps

  def abar(step):  # step -1: the clean latents
    return jnp.where(step < 0, 1.0, table[jnp.maximum(step, 0)])

  def invert(i, x):
    t_from = jnp.where(i == 0, -1, (i * s) // n)
    t_to = ((i + 1) * s) // n
    eps = sd.predict_noise(guidance, params, x, jnp.maximum(t_from, 0), uncond_emb)
    return ddim_move(abar(t_from), abar(t_to), x, eps)

  z_s = jax.lax.fori_loop(0, n, invert, latents.astype(jnp.float32))
  eps_s = sd.predict_noise(guidance, params, z_s, s, uncond_emb)
  z_t = ddim_move(abar(s), abar(t), z_s, eps_s)
  return sd.guided_noise(guidance, params, z_t, t, cond_emb, uncond_emb, guidance_scale) - eps_s
