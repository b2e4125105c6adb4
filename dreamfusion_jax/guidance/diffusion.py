"""Diffusion and score-distillation math on arrays, free of any model: noise schedules,
q-sample, v -> eps, classifier-free guidance, the weightings w(t), the surrogate loss,
DDIM steps and the DDIM sampler.

Nothing here knows a prior or a method: guidance/distill.py and the methods
(guidance/methods/) call these functions. Notation follows DDPM: alpha_bar_t = prod_{s<=t}
(1 - beta_s) is the signal fraction at integer timestep t in [0, T), and the noisy
latent is z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps.

The SDS gradient of DreamFusion eq. 3 with respect to the latent z is

    grad_z = w(t) (eps_hat(z_t; y, t) - eps),

with eps_hat the classifier-free-guided noise prediction. It skips the UNet Jacobian,
so it is injected through a surrogate loss whose gradient is exactly `grad_z`
(`sds_surrogate_loss`), and the chain rule carries it back through the VAE encoder
and the renderer.

Weightings w(t) (`sds_weight`, the `weighting` config field):
  "sds"         1 - alpha_bar_t. DreamFusion's w(t) = sigma_t^2 (appendix A.4: in
                the variance-preserving process sigma_t^2 = 1 - alpha_bar_t); the
                default of stable-dreamfusion and threestudio ("sds").
  "uniform"     1.
  "fantasia3d"  sqrt(alpha_bar_t) (1 - alpha_bar_t) (threestudio's "fantasia3d").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

WEIGHTINGS = ("sds", "uniform", "fantasia3d")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def ddpm_alphas_cumprod(
    *,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    num_train_timesteps: int,
) -> np.ndarray:
  """The DDPM noise schedule alpha_bar_t of a diffusers `scheduler_config.json`.

  "linear": betas evenly spaced from beta_start to beta_end (Ho et al.);
  "scaled_linear": betas whose square roots are evenly spaced (Stable Diffusion);
  "squaredcos_cap_v2": the cosine schedule of Nichol & Dhariwal, betas capped at
  0.999 (beta_start/beta_end unused), as diffusers computes it.

  Returns:
    (num_train_timesteps,) float32, decreasing from ~1 to ~0.
  """
  t = num_train_timesteps
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, t, dtype=np.float64)
  elif beta_schedule == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, t, dtype=np.float64) ** 2
  elif beta_schedule == "squaredcos_cap_v2":
    f = lambda s: np.cos((s / t + 0.008) / 1.008 * np.pi / 2) ** 2
    steps = np.arange(t, dtype=np.float64)
    betas = np.minimum(1.0 - f(steps + 1) / f(steps), 0.999)
  else:
    raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; known: {BETA_SCHEDULES}")
  # The product of 1000 factors runs in float64; diffusers uses float32 and agrees to
  # ~1e-6 relative.
  return np.cumprod(1.0 - betas).astype(np.float32)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def read_scheduler(config: dict, where: str) -> tuple[np.ndarray, str]:
  """(alphas_cumprod (T,) float32, prediction_type) of a diffusers
  `scheduler_config.json` (its defaults where a field is missing: DDPM's linear
  betas 1e-4..0.02 over 1000 steps, epsilon). `where` names the file in errors."""
  prediction_type = config.get("prediction_type", "epsilon")
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"{where}: prediction_type {prediction_type!r} is not supported; known: {PREDICTION_TYPES}")
  table = ddpm_alphas_cumprod(beta_start=config.get("beta_start", 0.0001), beta_end=config.get("beta_end", 0.02),
                              beta_schedule=config.get("beta_schedule", "linear"),
                              num_train_timesteps=config.get("num_train_timesteps", 1000))
  return table, prediction_type


def sample_timesteps(key: Array, batch_size: int, t_min: Array, t_max: Array,
                     num_train_timesteps: int) -> Array:
  """Integer timesteps t ~ U{round(t_min T), ..., round(t_max T)}, one per image.

  t_min and t_max are fractions of T = num_train_timesteps and may be traced, so a
  schedule that anneals them does not recompile. DreamFusion samples t in
  [0.02, 0.98] T: very small t gives no signal, very large t no detail.

  Args:
    key: PRNG key. batch_size: B (static).
    t_min, t_max: scalars in [0, 1], t_min <= t_max.

  Returns:
    (B,) int32 in [0, T - 1].
  """
  # Round, not floor: 0.02 * 1000 is 19.99999... in float32.
  lo = jnp.clip(jnp.round(t_min * num_train_timesteps), 0, num_train_timesteps - 1).astype(jnp.int32)
  hi = jnp.clip(jnp.round(t_max * num_train_timesteps), 0, num_train_timesteps - 1).astype(jnp.int32)
  return jax.random.randint(key, (batch_size,), lo, jnp.maximum(hi, lo) + 1, dtype=jnp.int32)


def split_draw_keys(key: Array) -> tuple[Array, Array, Array]:
  """(t key, noise key, posterior key) of one key, or of (B, 2) per-image keys (each
  then (B, 2)), so that an image's draws do not depend on the batch it is in."""
  if jnp.ndim(key) == 2:
    k_t, k_noise, k_posterior = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(key), 1, 0)
    return k_t, k_noise, k_posterior
  k_t, k_noise, k_posterior = jax.random.split(key, 3)
  return k_t, k_noise, k_posterior


def sample_timesteps_and_noise(k_t: Array, k_noise: Array, shape: tuple, t_range: Array,
                               num_train_timesteps: int) -> tuple[Array, Array]:
  """SDS's draws for B latents of `shape` (B, ...): t ~ U[t_min, t_max] T (B,) int32
  and eps ~ N(0, I) float32, from one key each or from (B, 2) per-image keys (each
  image's draws then depend only on its own key: splitting a batch across devices
  changes nothing)."""
  if jnp.ndim(k_t) == 2:
    t = jax.vmap(lambda k: sample_timesteps(k, 1, t_range[0], t_range[1], num_train_timesteps)[0])(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(k_noise)
    return t, noise
  return (sample_timesteps(k_t, shape[0], t_range[0], t_range[1], num_train_timesteps),
          jax.random.normal(k_noise, shape, jnp.float32))


def loss_metrics(loss: Array, t: Array, grad: Array, weight: Array, num_train_timesteps: int) -> dict[str, Array]:
  """The SDS family's logged scalars: "sds_loss", "timestep" (mean t as a fraction of
  T), "sds_grad_norm" (mean per-image L2 norm of the latent gradient (B, ...)),
  "sds_weight" (mean w(t))."""
  return {
      "sds_loss": loss,
      "timestep": jnp.mean(t.astype(jnp.float32)) / num_train_timesteps,
      "sds_grad_norm": jnp.mean(jnp.sqrt(jnp.sum(grad.reshape(grad.shape[0], -1) ** 2, axis=-1))),
      "sds_weight": jnp.mean(weight),
  }


def _per_sample(x: Array, ndim: int) -> Array:
  """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, to scale (B, ...) arrays."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def add_noise(alphas_cumprod: Array, latents: Array, noise: Array, t: Array) -> Array:
  """Forward diffusion q(z_t | z): sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps.

  Args:
    alphas_cumprod: (T,) alpha_bar. latents, noise: (B, ...). t: (B,) int32.

  Returns:
    (B, ...) noisy latents, in the dtype of `latents`.
  """
  abar = _per_sample(alphas_cumprod[t], latents.ndim)
  return (jnp.sqrt(abar) * latents + jnp.sqrt(1.0 - abar) * noise).astype(latents.dtype)


def epsilon_from_v(alphas_cumprod: Array, v: Array, noisy_latents: Array, t: Array) -> Array:
  """Noise from a v-prediction (Salimans & Ho 2022): eps = sqrt(abar) v + sqrt(1-abar) z_t.

  Models such as SD 2.1 (768) predict v = sqrt(abar) eps - sqrt(1 - abar) z; SDS
  needs eps.

  Args:
    alphas_cumprod: (T,). v, noisy_latents: (B, ...). t: (B,) int32.
  """
  abar = _per_sample(alphas_cumprod[t], v.ndim)
  return jnp.sqrt(abar) * v + jnp.sqrt(1.0 - abar) * noisy_latents


def classifier_free_guidance(eps_uncond: Array, eps_cond: Array, scale: float | Array) -> Array:
  """eps_hat = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022); s = 1 is the plain
  conditional prediction, DreamFusion uses s = 100.

  Args:
    eps_uncond, eps_cond: (B, ...) noise predictions without / with the prompt.
  """
  return eps_uncond + scale * (eps_cond - eps_uncond)


def sds_weight(alphas_cumprod: Array, t: Array, kind: str) -> Array:
  """w(t) of the SDS gradient; see the module docstring for the kinds.

  Args:
    alphas_cumprod: (T,). t: (B,) int32. kind: one of WEIGHTINGS.

  Returns:
    (B,) float32.
  """
  abar = alphas_cumprod[t].astype(jnp.float32)
  if kind == "sds":
    return 1.0 - abar
  if kind == "uniform":
    return jnp.ones_like(abar)
  if kind == "fantasia3d":
    return jnp.sqrt(abar) * (1.0 - abar)
  raise ValueError(f"weighting {kind!r} is not supported; known: {WEIGHTINGS}")


def sds_gradient(eps_hat: Array, noise: Array, weight: Array, grad_clip: float | None = None) -> Array:
  """The SDS gradient w(t) (eps_hat - eps) on the latents, made safe to apply.

  Non-finite entries (a diverged bf16 UNet, say) become 0 rather than poisoning the
  field's parameters, and with `grad_clip` each entry is clipped to [-c, c]
  (threestudio's `grad_clip`); None or 0 disables clipping.

  Args:
    eps_hat: (B, ...) guided noise prediction. noise: (B, ...) the eps that was added.
    weight: (B,) w(t).

  Returns:
    (B, ...) float32.
  """
  return weighted_gradient(eps_hat.astype(jnp.float32) - noise.astype(jnp.float32), weight, grad_clip)


def weighted_gradient(residual: Array, weight: Array, grad_clip: float | None = None) -> Array:
  """w(t) residual, made safe to apply as `sds_gradient` does: the gradient of every
  method of the SDS family (residual: SDS's eps_hat - eps, CSD's s (eps_c - eps_u), ...).

  Args:
    residual: (B, ...). weight: (B,) w(t).

  Returns:
    (B, ...) float32.
  """
  grad = _per_sample(weight, residual.ndim) * residual.astype(jnp.float32)
  grad = jnp.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
  if grad_clip:
    grad = jnp.clip(grad, -grad_clip, grad_clip)
  return grad


def sds_surrogate_loss(latents: Array, grad: Array) -> Array:
  """A scalar whose gradient with respect to `latents` is grad / B.

  0.5 sum((z - stop_grad(z - g))^2) / B: its derivative is z - (z - g) = g per image,
  averaged over the batch like a mean loss, so the learning rate does not depend on
  the number of views. Its value, 0.5 |g|^2 / B, tracks the gradient's size, not
  any distance to a target; it is for logging only.

  Args:
    latents: (B, ...) latents, differentiable back to the rendered images.
    grad: (B, ...) the SDS gradient (treated as a constant).

  Returns:
    scalar float32.
  """
  latents = latents.astype(jnp.float32)
  target = jax.lax.stop_gradient(latents - grad)
  return 0.5 * jnp.sum((latents - target) ** 2) / latents.shape[0]


def ddim_step(alphas_cumprod: Array, x_t: Array, eps: Array, t: Array, t_prev: Array,
              clip_x0: float | None = None) -> Array:
  """One deterministic DDIM step (Song et al. 2021, eq. 12 with eta = 0).

  x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);
  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with abar_prev = 1 for t_prev < 0.

  With `clip_x0 = c` the predicted x0 is clipped to [-c, c] and eps re-derived from
  the clipped x0 (static thresholding, as in Imagen): pixel-space models whose data
  lie in [-1, 1] otherwise drift to saturated, speckled samples under CFG.

  Args:
    alphas_cumprod: (T,). x_t, eps: (B, ...). t, t_prev: scalar int32 timesteps.
    clip_x0: None (no clipping) or the bound c > 0.

  Returns:
    (B, ...) x at t_prev.
  """
  abar_t = alphas_cumprod[t]
  abar_prev = jnp.where(t_prev >= 0, alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
  x0 = (x_t - jnp.sqrt(1.0 - abar_t) * eps) / jnp.sqrt(abar_t)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    eps = (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
  return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev) * eps


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


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> tuple[Array, Array]:
  """(t, t_prev): num_steps timesteps evenly spaced from T - 1 down to 0, and each
  one's successor (-1 after the last: the clean sample). Each (num_steps,) int32."""
  timesteps = jnp.asarray(np.linspace(num_train_timesteps - 1, 0, num_steps).round(), jnp.int32)
  return timesteps, jnp.concatenate([timesteps[1:], jnp.array([-1], jnp.int32)])


def ddim_sample(predict_eps, x: Array, alphas_cumprod: Array, *, num_steps: int,
                clip_x0: float | None = None) -> Array:
  """Deterministic DDIM sampling (eta = 0) from x_T to x_0.

  Args:
    predict_eps: (x (B, ...), t (B,) int32) -> eps (B, ...), e.g. a guided prediction.
    x: (B, ...) the initial noise x_T.
    alphas_cumprod: (T,). num_steps: DDIM steps (`ddim_timesteps`).
    clip_x0: see `ddim_step`.

  Returns:
    (B, ...) the sample.
  """
  b = x.shape[0]

  def step(x, ts):
    t, t_prev = ts
    eps = predict_eps(x, jnp.full((b,), t, jnp.int32))
    return ddim_step(alphas_cumprod, x, eps, t, t_prev, clip_x0), None

  x, _ = jax.lax.scan(step, x, ddim_timesteps(alphas_cumprod.shape[0], num_steps))
  return x
