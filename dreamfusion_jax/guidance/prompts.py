"""Text conditioning: view-dependent prompts and their embeddings, computed once per run.

DreamFusion (sec. 3.3) appends a view description to the prompt according to the
camera's azimuth and elevation. The bucket indices come from
`dreamfusion_jax.cameras.view_bucket`, in the order of `cameras.VIEW_BUCKETS`
(front, side, back, overhead); `VIEW_SUFFIXES` follows that order.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from dreamfusion_jax.guidance import conditioning
from dreamfusion_jax.guidance import perp_neg as perp_neg_lib

Array = jax.Array

# Index = view bucket (cameras.VIEW_BUCKETS = front, side, back, overhead).
VIEW_SUFFIXES = (", front view", ", side view", ", back view", ", overhead view")


@flax.struct.dataclass
class PromptEmbeddings:
  """Text embeddings of one run's prompt, a pytree to pass into the jitted step.

  Attributes:
    cond: (4, L, D) the prompt with each view suffix, indexed by view bucket; four
      copies of the plain prompt when view-dependent prompting is off.
    uncond: (L, D) the negative prompt ("" by default), the unconditional branch of
      classifier-free guidance.
  """

  cond: Array
  uncond: Array

  def for_views(self, cameras, buckets: Array, perp_neg: bool = False):
    """The views' conditioning object (`select_conditioning`)."""
    return select_conditioning(self, buckets, cameras.azimuth_deg, perp_neg)


class PromptEncoder(Protocol):
  """Anything with `encode_prompts(params, prompts) -> (N, L, D)`, e.g. a guidance."""

  def encode_prompts(self, params, prompts: Sequence[str]) -> Array:
    ...


def view_prompts(prompt: str, view_dependent: bool = True) -> tuple[str, ...]:
  """The 4 prompts of the view buckets: "<prompt>, front view", ... or 4 x `prompt`."""
  if not view_dependent:
    return (prompt,) * len(VIEW_SUFFIXES)
  return tuple(prompt + suffix for suffix in VIEW_SUFFIXES)


def make_prompt_embeddings(
    guidance: PromptEncoder,
    params,
    prompt: str,
    negative_prompt: str = "",
    view_dependent: bool = True,
) -> PromptEmbeddings:
  """Encodes the view prompts and the negative prompt in one text-encoder call.

  Args:
    guidance: a prior with `encode_prompts` (e.g. StableDiffusionGuidance).
    params: its parameters.
    prompt: the text prompt. negative_prompt: the unconditional prompt.
    view_dependent: append the view suffixes; otherwise all buckets get `prompt`.
  """
  texts = view_prompts(prompt, view_dependent) + (negative_prompt,)
  emb = guidance.encode_prompts(params, texts)
  return PromptEmbeddings(cond=emb[:-1], uncond=emb[-1])


def select_conditioning(prompt_embeddings: PromptEmbeddings, buckets: Array, azimuth_deg: Array,
                        perp_neg: bool = False) -> conditioning.TextPair | conditioning.PerpNeg:
  """The views' conditioning: each view's prompt and the negative prompt
  (`select_embeddings`), or with `perp_neg` Perp-Neg's (perp_neg.view_conditioning:
  interpolated positives, view negatives, weights)."""
  cond, uncond = select_embeddings(prompt_embeddings, buckets)
  if not perp_neg:
    return conditioning.TextPair(cond=cond, uncond=uncond)
  views = perp_neg_lib.view_conditioning(prompt_embeddings.cond, prompt_embeddings.uncond, azimuth_deg, buckets)
  return conditioning.PerpNeg(pos=views["pos"], neg=views["neg"], neg_weights=views["neg_weights"], uncond=uncond)


def select_embeddings(prompt_embeddings: PromptEmbeddings, buckets: Array) -> tuple[Array, Array]:
  """Per-image conditional and unconditional embeddings for a batch of cameras.

  Args:
    prompt_embeddings: cond (4, L, D), uncond (L, D).
    buckets: (B,) int32 view buckets (cameras.view_bucket).

  Returns:
    cond (B, L, D), uncond (B, L, D).
  """
  cond = jnp.take(prompt_embeddings.cond, buckets, axis=0)
  uncond = jnp.broadcast_to(prompt_embeddings.uncond, cond.shape)
  return cond, uncond
