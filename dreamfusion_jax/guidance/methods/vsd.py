"""Variational Score Distillation (ProlificDreamer, Wang et al. 2023).

SDS pulls every render towards the prior's mode; VSD treats the 3D scene as a sample
of a distribution whose renders should match the prior's, and replaces SDS's random
noise by the score of the renders' own distribution, estimated by a second diffusion
model trained alongside the scene:

    residual = eps_cfg(z_t; y, t) - eps_lora(z_t; y, c, t)

eps_cfg: the frozen prior with classifier-free guidance (any conditioning, Perp-Neg
included); eps_lora: the same prior with a low-rank update (LoRA) of every attention
projection and the camera c embedded into its timestep embedding. The gradient is
w(t) residual like every method of the family (guidance/distill.py).

The LoRA ("trainable" below) is fitted to the renders, detached, by the usual
denoising loss at its own timestep t' ~ U{0, ..., T-1} and noise:

    lora_loss = mean |eps_lora(sqrt(abar_t') z + sqrt(1 - abar_t') eps'; y, c, t') - eps'|^2

(in epsilon space for every model: for a v-prediction model that is the v loss times
abar_t'). The surrogate loss's gradient reaches the scene only and the LoRA loss's
the LoRA only, so one jax.grad of their sum over {scene, LoRA} parameters trains both;
the train step applies it like any other parameter group, at `settings.vsd_lr`.

Parameterisation, as in diffusers' LoRA layers and threestudio's VSD: kernel W (in,
out) of attn1/attn2's to_q, to_k, to_v, to_out_0 becomes W + A B, A (in, r) ~ N(0,
1/r^2), B (r, out) = 0; the camera (the 3x4 camera-to-world matrix, flattened) goes
through Dense(12, D) - SiLU - Dense(D, D) with a zero last layer, D the UNet's
time-embedding width, and is added to the time embedding. Both are zero at
initialisation, so eps_lora starts as the prior's conditional prediction eps_cond
and the first residual is eps_cfg - eps_cond. Differences from threestudio: its
LoRA model drops the camera for 10% of its training samples (only used for CFG of the
LoRA, whose scale is 1 in VSD); here it never does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dreamfusion_jax.guidance import conditioning, diffusion

Array = jax.Array

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")  # the projections of diffusers' FlaxAttention
CAMERA_DIM = 12  # a flattened 3x4 camera-to-world matrix


def lora_paths(unet_params: Any) -> list[tuple[str, ...]]:
  """Paths (tuples of keys) of the attention projections' kernels that get a LoRA."""
  flat = traverse_util.flatten_dict(unet_params)
  return sorted(k for k in flat if len(k) >= 3 and k[-1] == "kernel" and k[-2] in LORA_TARGETS
                and k[-3] in ("attn1", "attn2"))


def time_embed_dim(unet_params: Any) -> int:
  """D, the width of the UNet's time embedding (the camera embedding's output)."""
  return int(unet_params["time_embedding"]["linear_2"]["kernel"].shape[-1])


def init_state(params: Any, key: Array, settings) -> dict:
  """The trainable state of VSD: {"lora": {path...: {"a", "b"}}, "camera": {...}}.

  Args:
    params: the prior's params; only the shapes of params["unet"] are read (arrays or
      ShapeDtypeStructs). key: PRNG key (A's initialisation). settings: its
      vsd_lora_rank is r.

  Returns:
    a float32 param tree whose contribution is zero (B = 0, last camera layer 0).
  """
  unet_params, rank = params["unet"], settings.vsd_lora_rank
  flat = traverse_util.flatten_dict(unet_params)
  paths = lora_paths(unet_params)
  if not paths:
    raise ValueError("guidance.method=vsd: the UNet has no attention projections (to_q/to_k/to_v/to_out_0) "
                     "to put a LoRA on")
  keys = jax.random.split(key, len(paths) + 1)
  lora = {}
  for k, path in zip(keys[:-1], paths):
    d_in, d_out = flat[path].shape
    lora[path[:-1]] = {"a": jax.random.normal(k, (d_in, rank), jnp.float32) / rank,
                       "b": jnp.zeros((rank, d_out), jnp.float32)}
  d = time_embed_dim(unet_params)
  bound = 1.0 / jnp.sqrt(CAMERA_DIM)
  camera = {"w1": jax.random.uniform(keys[-1], (CAMERA_DIM, d), jnp.float32, -bound, bound),
            "b1": jnp.zeros((d,), jnp.float32),
            "w2": jnp.zeros((d, d), jnp.float32), "b2": jnp.zeros((d,), jnp.float32)}
  return {"lora": traverse_util.unflatten_dict(lora), "camera": camera}


def state_learning_rate(settings) -> float:
  return float(settings.vsd_lr)


def merge_lora(unet_params: Any, lora: Any) -> Any:
  """The UNet's params with W + A B for every LoRA'd kernel (dtype of W kept)."""
  flat = dict(traverse_util.flatten_dict(unet_params))
  for path, ab in traverse_util.flatten_dict(lora, is_leaf=lambda _, v: "a" in v and "b" in v).items():
    w = flat[path + ("kernel",)]
    flat[path + ("kernel",)] = (w.astype(jnp.float32) + ab["a"] @ ab["b"]).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def camera_embedding(camera: dict, c2w: Array) -> Array:
  """(B, 3, 4) or (B, 4, 4) camera-to-world [R | t] (cameras.pose_matrices) -> (B, D),
  added to the UNet's time embedding."""
  x = c2w[:, :3, :4].reshape(c2w.shape[0], CAMERA_DIM).astype(jnp.float32)
  return nn.silu(x @ camera["w1"] + camera["b1"]) @ camera["w2"] + camera["b2"]


def lora_noise(prior, params, state: dict, noisy_latents: Array, t: Array, cond, c2w: Array) -> Array:
  """eps_lora(z_t; y, c, t): the prior under the conditioning's positive branch, with
  the LoRA merged into params["unet"] and the camera embedding added to the UNet's
  time embedding (flax method interception of its `time_embedding`).

  Args:
    noisy_latents: (B, h, w, C). t: (B,) int32. cond: a conditioning object. c2w: (B, 3, 4).

  Returns:
    (B, h, w, C) float32.
  """
  offset = camera_embedding(state["camera"], c2w)

  def add_camera(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.name == "time_embedding":
      out = out + offset.astype(out.dtype)
    return out

  merged = {**params, "unet": merge_lora(params["unet"], state["lora"])}
  with nn.intercept_methods(add_camera):
    return prior.noise_predictions(merged, noisy_latents, t, [cond.positive()])[0]


def residual(prior, params, latents: Array, cond, t: Array, noise: Array, *, scale, settings, state: dict,
             c2w: Array) -> Array:
  """eps_hat(z_t; y) - eps_lora(z_t; y, c): (B, h, w, C) float32 (see methods/__init__.py)."""
  del settings
  if state is None or c2w is None:
    raise ValueError("guidance.method=vsd needs its trainable LoRA and the views' cameras")
  noisy = diffusion.add_noise(params["alphas_cumprod"], latents, noise, t)
  eps_hat = conditioning.guided_noise(prior, params, noisy, t, cond, scale)
  return eps_hat - lora_noise(prior, params, state, noisy, t, cond, c2w)


def lora_loss(prior, params, state: dict, latents: Array, cond, t: Array, noise: Array, c2w: Array) -> Array:
  """The LoRA's denoising loss on the (detached) latents of the renders; a scalar.

  Args:
    latents: (B, h, w, C). t: (B,) int32, the LoRA's own timesteps. noise: like latents.
  """
  latents = jax.lax.stop_gradient(latents.astype(jnp.float32))
  noisy = diffusion.add_noise(params["alphas_cumprod"], latents, noise, t)
  eps = lora_noise(prior, params, state, noisy, t, cond, c2w)
  return jnp.mean((eps - noise) ** 2)


def lora_draws(key: Array, latents_shape: tuple, num_train_timesteps: int) -> tuple[Array, Array]:
  """The LoRA loss's own (t' (B,) int32, noise' (B, h, w, C)): each image's from
  fold_in(its noise key, 1); `key` one key or (B, 2) per-image keys."""

  def draw(k):
    k_t, k_n = jax.random.split(jax.random.fold_in(k, 1))
    return (jax.random.randint(k_t, (), 0, num_train_timesteps, dtype=jnp.int32),
            jax.random.normal(k_n, latents_shape[1:], jnp.float32))

  keys = key if jnp.ndim(key) == 2 else jax.random.split(key, latents_shape[0])
  return jax.vmap(draw)(keys)


def extra_losses(prior, params, state, latents, cond, *, key, c2w, settings) -> dict:
  """{"vsd_lora_loss"}: the LoRA fitted to the renders at t' ~ U{0..T-1} (`lora_draws`)."""
  del settings
  t, noise = lora_draws(key, latents.shape, params["alphas_cumprod"].shape[0])
  return {"vsd_lora_loss": lora_loss(prior, params, state, latents, cond, t, noise, c2w)}
