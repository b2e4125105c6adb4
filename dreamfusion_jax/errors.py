"""The error type for bad input: the scripts print its message as one line and exit
non-zero, before anything in a workdir has changed."""


class InputError(ValueError):
  """A config value, path or file that cannot work; the message names it and what would."""
