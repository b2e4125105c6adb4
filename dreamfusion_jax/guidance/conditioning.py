"""What a prior is conditioned on, per view, and the guidance direction that implies.

Every conditioning object is a pytree of (B, ...) arrays, one row per view, with
three answers that are all a method needs (so every method works with every prior):

  branches()     the K conditionings whose noise predictions the guidance combines;
                 the prior predicts all K in ONE batched call
                 (prior.noise_predictions(params, noisy, t, cond.branches())).
  direction(eps) (eps_u, d) from those K predictions (each (B, h, w, C)): the guided
                 prediction is eps_u + s d (`guided_noise`).
  unconditional() / positive()
                 the one branch of the empty prompt / of the object itself (ISM's
                 inversion; VSD's LoRA model).

The kinds: `TextPair` (a prompt and the negative prompt: classifier-free guidance),
`PerpNeg` (Perp-Neg's interpolated positive and view negatives), `ImageView`
(Zero-1-to-3: the input image and the view's camera; its unconditional branch is the
conditioning zeroed after the projection, as zero123's).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from dreamfusion_jax.guidance import diffusion, perp_neg

Array = jax.Array


@flax.struct.dataclass
class TextPair:
  """Classifier-free guidance: cond, uncond (B, L, D) text embeddings."""

  cond: Array
  uncond: Array

  def branches(self) -> list[Array]:
    return [self.uncond, self.cond]

  def direction(self, eps: Sequence[Array]) -> tuple[Array, Array]:
    eps_u, eps_c = eps
    return eps_u, eps_c - eps_u

  def unconditional(self) -> Array:
    return self.uncond

  def positive(self) -> Array:
    return self.cond


@flax.struct.dataclass
class PerpNeg:
  """Perp-Neg (perp_neg.py): pos (B, L, D), neg (B, 2, L, D), neg_weights (B, 2),
  uncond (B, L, D); one batched call on uncond, positive and the two negatives."""

  pos: Array
  neg: Array
  neg_weights: Array
  uncond: Array

  def branches(self) -> list[Array]:
    return [self.uncond, self.pos, self.neg[:, 0], self.neg[:, 1]]

  def direction(self, eps: Sequence[Array]) -> tuple[Array, Array]:
    eps_u, eps_pos, eps_neg0, eps_neg1 = eps
    return eps_u, perp_neg.guidance_direction(eps_u, eps_pos, jnp.stack([eps_neg0, eps_neg1], axis=1),
                                              self.neg_weights)

  def unconditional(self) -> Array:
    return self.uncond

  def positive(self) -> Array:
    return self.pos


@flax.struct.dataclass
class ImageView:
  """Zero-1-to-3: the input image's embedding (B, P) and latents (B, h, w, C), each
  view's camera relative to the input's (B, 4), and keep (B,) float32: 1 for the
  conditional branch, 0 for the unconditional one (the projected context and the
  input latents multiplied by it, i.e. zeroed)."""

  embedding: Array
  latents: Array
  camera: Array
  keep: Array

  def branches(self) -> list["ImageView"]:
    return [self.unconditional(), self]

  def direction(self, eps: Sequence[Array]) -> tuple[Array, Array]:
    eps_u, eps_c = eps
    return eps_u, eps_c - eps_u

  def unconditional(self) -> "ImageView":
    return self.replace(keep=jnp.zeros_like(self.keep))

  def positive(self) -> "ImageView":
    return self


def concatenate(branches: Sequence[Any]) -> Any:
  """K conditionings of B rows each -> one of K B rows (for one batched model call)."""
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *branches)


def guided_noise(prior, params, noisy_latents: Array, t: Array, cond, scale: Array | float) -> Array:
  """eps_u + s d (classifier-free guidance, or the conditioning's own direction):
  (B, h, w, C) float32 from one batched call of the prior."""
  eps_u, direction = guidance_direction(prior, params, noisy_latents, t, cond)
  return eps_u + scale * direction


def guidance_direction(prior, params, noisy_latents: Array, t: Array, cond) -> tuple[Array, Array]:
  """(eps_u, d) of `cond` at the noisy latents (B, h, w, C), timesteps t (B,)."""
  return cond.direction(prior.noise_predictions(params, noisy_latents, t, cond.branches()))


def sample(prior, params, cond, key: Array, *, num_steps: int = 20, guidance_scale: float = 3.0) -> Array:
  """Images drawn from the prior under `cond` (B rows) by guided DDIM (eta = 0):
  (B, H, W, 3) float32 in [0, 1]. Pixel-space priors clip each step's x0 prediction
  to the data range [-1, 1]; latent priors (unbounded latents) do not."""
  b = jax.tree_util.tree_leaves(cond)[0].shape[0]
  x = jax.random.normal(key, (b, prior.latent_size, prior.latent_size, prior.latent_channels), jnp.float32)
  x = diffusion.ddim_sample(lambda z, t: guided_noise(prior, params, z, t, cond, guidance_scale), x,
                            params["alphas_cumprod"], num_steps=num_steps,
                            clip_x0=1.0 if prior.pixel_space else None)
  return prior.decode(params, x)
