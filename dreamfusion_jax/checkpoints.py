"""Orbax checkpoints of the TrainState: periodic, last K kept, atomic, multi-process safe.

Orbax writes each checkpoint into a temporary directory and renames it when complete,
so a crash mid-save leaves the previous checkpoints intact and `latest_step` never
returns a half-written one.

States are saved and restored as host numpy arrays. The train state is replicated (every
device and every process holds the same values after the gradient `pmean`), and orbax
writes a replicated numpy array once, from process 0, while every process takes part in
the save; pmap's device arrays are host-local and orbax refuses them in a multi-process
job. On restore every process reads the same files.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dreamfusion_jax import errors


def _drop_closed_loop_noise() -> None:
  """Installs (once) an unraisable-exception hook that drops `RuntimeError('Event loop
  is closed')` and an asyncio log filter that drops "Task exception was never
  retrieved": when orbax fails to read a damaged checkpoint it closes its event loop
  while TensorStore still completes the outstanding reads, and each completion prints
  a traceback (dozens per failed read) around our one-line error. Every other
  unraisable exception and log record passes."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_noise", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._drops_closed_loop_noise = True
  sys.unraisablehook = hook
  # The same failed reads also leave asyncio tasks whose errors nobody retrieves (the
  # error already reached us through the first one); asyncio logs each at exit.
  logging.getLogger("asyncio").addFilter(
      lambda record: not str(record.msg).startswith("Task exception was never retrieved"))


class CheckpointError(errors.InputError):
  """A checkpoint that cannot be restored into this run; the message names it."""


def _host_template(target: Any) -> Any:
  """numpy zeros with the shapes and dtypes of `target` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.dtype(x.dtype)), target)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_shapes(tree: Any, *, is_leaf=None) -> dict[str, tuple]:
  """{"params/field/...": shape} of every array leaf (attribute and dict keys alike)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {"/".join(_key_name(k) for k in path): tuple(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape)
          for path, leaf in flat}


class Checkpointer:
  """Saves and restores TrainStates under `directory` (one subdirectory per step)."""

  def __init__(self, directory: str, *, max_to_keep: int, create: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
        item_handlers=ocp.StandardCheckpointHandler())  # so metadata reads work before any save

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Saves an unreplicated state (asynchronously; `wait` blocks until written).
    Every process of a multi-process job must call it with the same step."""
    self._manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)), force=True)

  def restore(self, target: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, shapes and dtypes of `target` (latest step by
    default), as host numpy arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    _drop_closed_loop_noise()
    return self._manager.restore(step, args=ocp.args.StandardRestore(_host_template(target)))

  def shape_mismatches(self, target: Any, step: int) -> list[str]:
    """Leaves whose saved shape differs from `target`'s (or that one side lacks)."""
    _drop_closed_loop_noise()
    metadata = self._manager.item_metadata(step)
    tree = getattr(metadata, "tree", metadata)
    saved = leaf_shapes(tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, (dict, list, tuple)))
    wanted = leaf_shapes(target)
    return sorted(f"{k}: saved {saved.get(k)} vs {wanted.get(k)}" for k in set(saved) | set(wanted)
                  if saved.get(k) != wanted.get(k))

  def restore_newest_good(self, target: Any, *, below: Optional[int] = None) -> tuple[Any, int, list[int]]:
    """The newest checkpoint that restores (of the steps before `below`, if given).

    Returns:
      (state, its step, the newer steps that failed to restore). Raises
      CheckpointError when none restores. Nothing is deleted.
    """
    damaged = []
    for step in reversed([s for s in self.all_steps() if below is None or s < below]):
      try:
        return self.restore(target, step), step, damaged
      except Exception:  # pylint: disable=broad-except  (any failure to read means damaged)
        damaged.append(step)
    raise CheckpointError(f"no checkpoint in {self.directory} restores (damaged steps: {damaged})")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def due(step: int, *, every: int, last: int, stopping: bool) -> bool:
  """Whether a loop saves after `step`: every `every` steps, at the last one, and when
  asked to stop (so a stopped run resumes where it was)."""
  return step % every == 0 or step == last or stopping


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag checked between steps, so the loop can save a
  checkpoint and exit cleanly instead of dying mid-step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
