"""THE score-distillation loss: one for every prior x method.

    images --prior.encode--> latents z;  t ~ U[t_min, t_max] T, eps ~ N(0, I);
    r = method.residual(prior, z, cond, t, eps)          (stop-gradient: the prior is frozen)
    g = w(t) r  (nan -> 0, optionally clipped);   loss = surrogate with d loss / d z = g / B
    + method.extra_losses (the method's own state, e.g. VSD's LoRA)

The surrogate's gradient reaches the renders through the encoder; the extra losses
reach only the method's state. The prior answers through its contract (encode,
noise_predictions, params["alphas_cumprod"], num_train_timesteps, settings); the
method through methods/__init__.py's; the conditioning object decides the guidance
direction (conditioning.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dreamfusion_jax.guidance import diffusion

Array = jax.Array


def latent_loss(prior, method, params, latents: Array, cond, t: Array, noise: Array, *, scale: Any = None,
                state: Any = None, c2w: Array | None = None, key: Array | None = None) -> tuple[Array, dict]:
  """The loss of latents at given timesteps and noise (no randomness inside but the
  extra losses' draws from `key`).

  Args:
    prior, method: the static prior and the method's module. params: the prior's.
    latents: (B, h, w, C) float32, differentiable. cond: a conditioning object.
    t: (B,) int32. noise: (B, h, w, C). scale: the guidance scale (None: the prior's
      settings'; may be traced). state: the method's own trainable state (or None).
    c2w: (B, 3, 4) the views' cameras. key: the noise key, one or (B, 2) (the extra
      losses' draws).

  Returns:
    (loss, metrics): "sds_loss" (the surrogate), "timestep" (mean t / T),
    "sds_grad_norm", "sds_weight", and each extra loss by its name (added to the loss).
  """
  s = prior.settings
  scale = s.guidance_scale if scale is None else scale
  residual = jax.lax.stop_gradient(method.residual(
      prior, params, jax.lax.stop_gradient(latents), cond, t, noise, scale=scale, settings=s,
      state=jax.lax.stop_gradient(state), c2w=c2w))
  weight = diffusion.sds_weight(params["alphas_cumprod"], t, s.weighting)
  grad = diffusion.weighted_gradient(residual, weight, s.grad_clip)
  loss = diffusion.sds_surrogate_loss(latents, grad)
  metrics = diffusion.loss_metrics(loss, t, grad, weight, prior.num_train_timesteps)
  for name, value in method.extra_losses(prior, params, state, latents, cond, key=key, c2w=c2w, settings=s).items():
    loss = loss + value
    metrics[name] = value
  return loss, metrics


def loss(prior, method, params, images: Array, cond, key: Array, t_range: Array | None = None, *,
         scale: Any = None, state: Any = None, c2w: Array | None = None) -> tuple[Array, dict]:
  """The distillation loss of a batch of renders: pure and jittable; its gradient with
  respect to `images` goes back through the prior's encoder.

  Args:
    images: (B, H, W, 3) float32 in [0, 1].
    cond: the views' conditioning object (B rows).
    key: one PRNG key, or (B, 2) per-image keys so that an image's draws do not depend
      on the batch it is in (the train step's device-count independence needs this).
    t_range: (2,) float32 [t_min, t_max] fractions of T, may be traced (annealing);
      None: the prior's settings'.
    scale, state, c2w: see `latent_loss`.

  Returns:
    (scalar loss, metrics dict of scalars).
  """
  s = prior.settings
  if t_range is None:
    t_range = jnp.array([s.t_min, s.t_max], jnp.float32)
  k_t, k_noise, k_posterior = diffusion.split_draw_keys(key)
  latents = prior.encode(params, images, k_posterior)
  t, noise = diffusion.sample_timesteps_and_noise(k_t, k_noise, latents.shape, t_range, prior.num_train_timesteps)
  return latent_loss(prior, method, params, latents, cond, t, noise, scale=scale, state=state, c2w=c2w, key=k_noise)
