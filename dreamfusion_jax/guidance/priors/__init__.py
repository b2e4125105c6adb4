"""The frozen 2D diffusion models a scene is distilled from, one module each, chosen by
`config.guidance.prior` (the module's name, or the dotted path of a module elsewhere).

The contract of a prior module:

  CONDITIONS_ON            "text" or "image": what a run conditions it on.
  from_config(cfg, **kw)   -> (prior, params): loads config.guidance.model, checking
                           that the directory fits this prior (one line otherwise).

and of the static prior object it returns (params are a separate pytree holding
"alphas_cumprod" (T,) float32 and the model weights):

  settings, num_train_timesteps, prediction_type, latent_size, latent_channels, pixel_space
  encode(params, images (B, H, W, 3) in [0, 1], key) -> latents (B, h, w, C)
  decode(params, latents) -> images in [0, 1]
  noise_predictions(params, noisy (B, h, w, C), t (B,), branches: K conditionings)
                           -> K eps (B, h, w, C), from ONE batched model call
  encode_prompts(params, prompts) (text priors) / encode_image(params, image, camera)
  (image priors): what the run's conditioning is made of.

A prior never imports a method (guidance/methods/).
"""

from dreamfusion_jax.guidance import members


def names() -> tuple[str, ...]:
  """The priors of this package: its modules' names."""
  return members.names(__name__)


def exists(name: str) -> bool:
  """A name `get` can load: one of `names()`, or a dotted module path outside the
  package (a project's own prior: `my_project.my_prior`) that can be found."""
  return members.exists(__name__, name)


def get(name: str):
  """The prior's module: `names()`' by its name, or any module by its dotted path."""
  return members.get(__name__, name, "config.guidance.prior")
