"""The members of the score-distillation family: how a prior's score becomes a gradient.

One module per method, chosen by `config.guidance.method` (the module's name, or the dotted
path of a module elsewhere: a project's own method needs no edit here). Each
defines the same four functions (the contract; guidance/distill.py calls them):

  init_state(params, key, settings) -> pytree | None
      the method's own parameters, trained with the scene by the same gradient (VSD's
      LoRA); None where it has none. Only shapes of the prior's `params` are read.
  state_learning_rate(settings) -> float | None
      the learning rate of that state (None with none).
  residual(prior, params, latents, cond, t, noise, *, scale, settings, state, c2w) -> (B, h, w, C)
      r, the gradient on the latents being w(t) r: latents (B, h, w, C) stop-gradient,
      cond a conditioning object (conditioning.py), t (B,) int32, noise like latents,
      scale the guidance scale (float or traced), state the method's own (stop-gradient),
      c2w (B, 3, 4) the views' cameras.
  extra_losses(prior, params, state, latents, cond, *, key, c2w, settings) -> {name: scalar}
      losses of the method's own state (VSD's LoRA denoising loss); key: the draws'
      noise key, one or (B, 2) per image.

A method imports the model-free math (diffusion.py) and conditioning.py, never a prior:
it reaches the model through `prior.noise_predictions` only.
"""

from dreamfusion_jax.guidance import members


def names() -> tuple[str, ...]:
  """The methods of this package: its modules' names."""
  return members.names(__name__)


def exists(name: str) -> bool:
  """A name `get` can load: one of `names()`, or a dotted module path outside the
  package (a project's own method: `my_project.my_method`) that can be found."""
  return members.exists(__name__, name)


def get(name: str):
  """The method's module: `names()`' by its name, or any module by its dotted path."""
  return members.get(__name__, name, "config.guidance.method")
