"""Atomic file writes: a crash or an error mid-write never leaves a truncated file
where a good one was, and never a stray temporary file beside it."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def _default_mode() -> int:
  """0666 less the process umask: what `open(path, "w")` would have given."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Calls write(tmp) on a temporary path beside `path` (same extension, so writers
  that infer the format from it work), then renames it onto `path`. On any error the
  temporary file is removed and `path` is left as it was."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, _default_mode())  # mkstemp creates files private (0600)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)

  write_atomically(path, write)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))
