"""Choosing a seam's member by name: the module of that name in the seam's package, or a
module anywhere by its dotted path (a project's own method or prior). No registry: the
file name is the name (big_vision's `importlib.import_module(f"...{config.model_name}")`).
"""

import importlib
import importlib.util
import pkgutil


def names(package: str) -> tuple[str, ...]:
  """The members of `package` (a dotted name): its modules not starting with "_"."""
  path = importlib.import_module(package).__path__
  return tuple(sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_")))


def exists(package: str, name: str) -> bool:
  """Whether `get` can load `name`: one of `names(package)`, or a dotted module path
  that can be found."""
  if name in names(package):
    return True
  try:
    return "." in name and importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def get(package: str, name: str, field: str):
  """The member's module; a name that is neither is one line naming `field`."""
  if not exists(package, name):
    raise ValueError(f"{field}={name!r}; known: {', '.join(names(package))} (or a dotted module path)")
  return importlib.import_module(name if "." in name else f"{package}.{name}")
