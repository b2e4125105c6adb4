"""Atomic file writes: a crash or an error mid-write never leaves a truncated file
where a good one was, and never a stray temporary file beside it.

`write_dir_atomically` does the same for a directory written as a whole (the
embedded toy prior: configs, weights, tokenizer). `exclusive_lock` keeps a second
process out of a directory that one is writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from typing import Callable, Iterator


def _default_mode(base: int = 0o666) -> int:
  """`base` less the process umask: 0666 is what `open(path, "w")` would have given,
  0777 what `os.mkdir` would have."""
  umask = os.umask(0)
  os.umask(umask)
  return base & ~umask


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


def write_dir_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Calls write(tmp) on a fresh temporary directory beside `path`, then puts it in
  place of `path` (a directory, or nothing yet): afterwards `path` holds either the
  complete new directory or the old one, never a mix. On any error the temporary
  directory is removed and `path` is left as it was.

  A directory cannot replace a non-empty one in one rename, so the swap is two: the
  old directory to `path`.old, the new one to `path`. A crash between the two leaves
  the old directory at `path`.old (nothing is lost); the next write removes it.
  """
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path), dir=parent)
  old = path + ".old"
  try:
    write(tmp)
    os.chmod(tmp, _default_mode(0o777))  # mkdtemp creates directories private (0700)
    if os.path.exists(path):
      shutil.rmtree(old, ignore_errors=True)  # a leftover of an interrupted swap; `path` is complete
      os.replace(path, old)
      try:
        os.replace(tmp, path)
      except BaseException:
        os.replace(old, path)
        raise
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(old, ignore_errors=True)


class LockedError(RuntimeError):
  """Another live process holds the lock."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
  """Holds an exclusive lock on the file `path` (created if missing, left in place) for
  the block: a second process asking for it gets a LockedError naming `what` and the
  holder's pid. flock(2): the kernel drops it when its holder dies, even by SIGKILL, so
  a crashed holder leaves no stale lock behind (the file stays: removing it on release
  would let two processes lock two inodes of one name)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      raise LockedError(f"{what} is in use by another process (pid {holder}; lock {path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
