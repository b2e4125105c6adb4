"""The state-related half of the method contract for the methods without a state of
their own (sds, csd, ism): nothing to initialise, to train or to add to the loss."""


def init_state(params, key, settings) -> None:
  del params, key, settings
  return None


def state_learning_rate(settings) -> None:
  del settings
  return None


def extra_losses(prior, params, state, latents, cond, *, key, c2w, settings) -> dict:
  del prior, params, state, latents, cond, key, c2w, settings
  return {}
