"""The error type for bad input: the scripts print its message as one line and exit
non-zero, before anything in a workdir has changed."""


class InputError(ValueError):
  """A config value, path or file that cannot work; the message names it and what would."""


def first_line(error: BaseException, limit: int = 200) -> str:
  """The first line of an error's message (library errors run to pages), or its type."""
  text = str(error).strip()
  return text.splitlines()[0][:limit] if text else type(error).__name__
