"""Multi-process (multi-host) start-up: one JAX process per host, all hosts in one job.

Each host runs the same command. `initialize` joins the job before JAX touches a
device; the coordinator address, process count and process id come from the config's
`cluster` fields where set, else from JAX's own sources: the JAX_COORDINATOR_ADDRESS
environment variable, or auto-detection on Cloud TPU, SLURM, Open MPI and
Kubernetes (jax.distributed.initialize's cluster detection).
"""

from __future__ import annotations

import jax
import ml_collections

from dreamfusion_jax import errors


class ClusterError(errors.InputError):
  """The job could not be joined; the message says what was missing."""


class PeerLostError(RuntimeError):
  """A collective failed because another process of the job died or lost contact."""


def initialize(cluster: ml_collections.ConfigDict) -> None:
  """Joins the multi-process job described by `cluster` (config.cluster).

  Args:
    cluster: coordinator_address ("" = from the environment / auto-detect),
      num_processes (0 = auto), process_id (-1 = auto), initialization_timeout_s,
      heartbeat_timeout_s (how long a silent peer is waited for before the job fails),
      shutdown_timeout_s (how long processes wait for each other at exit).
  """
  # On CPU, cross-process collectives need an implementation (gloo ships with jaxlib);
  # GPU and TPU backends bring their own and ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {
      "coordinator_address": cluster.coordinator_address or None,
      "num_processes": cluster.num_processes if cluster.num_processes > 0 else None,
      "process_id": cluster.process_id if cluster.process_id >= 0 else None,
      "initialization_timeout": int(cluster.initialization_timeout_s),
      "heartbeat_timeout_seconds": int(cluster.heartbeat_timeout_s),
      "shutdown_timeout_seconds": int(cluster.shutdown_timeout_s),
  }
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as e:
    raise ClusterError(
        f"could not join the multi-process job ({errors.first_line(e)}); outside an auto-detected cluster (Cloud TPU, "
        f"SLURM, ...) set --config.cluster.coordinator_address=HOST:PORT, --config.cluster.num_processes=N and "
        f"--config.cluster.process_id=I on every host (or JAX_COORDINATOR_ADDRESS)") from e


class PeerWatchdog:
  """Notices a process of the job that died or hung, within `timeout_s`.

  Without it, a survivor blocks in its next collective until JAX's coordination
  service declares the peer dead (heartbeat timeout) and aborts the process with a
  multi-page log. Here every process bumps a counter in the job's key-value store each
  `interval_s` from a daemon thread (threads run while the main thread waits in XLA),
  and reads the others'; a peer whose counter stands still for `timeout_s`, or a lost
  coordinator, calls `on_lost(message)`, which the script turns into one line and an
  exit. A process that finished its work marks itself done first, so that finishing
  early (process 0 still writing a video) is not taken for dying.
  """

  PREFIX = "dreamfusion_jax/watchdog"

  def __init__(self, on_lost, *, timeout_s: float, interval_s: float = 1.0):
    import threading

    from jax._src import distributed as jax_distributed  # the client JAX itself uses

    self._client = jax_distributed.global_state.client
    self._me, self._count = jax.process_index(), jax.process_count()
    self._on_lost, self._timeout_s, self._interval_s = on_lost, float(timeout_s), float(interval_s)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)

  def __enter__(self) -> "PeerWatchdog":
    if self._count > 1 and self._client is not None:
      self._thread.start()
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None and self._client is not None and self._count > 1:
      self._client.key_value_set(f"{self.PREFIX}/done/{self._me}", "1", allow_overwrite=True)
    self._stop.set()

  def _get(self, key: str):
    try:
      return self._client.key_value_try_get(key)
    except Exception:  # pylint: disable=broad-except  (not set yet)
      return None

  def _run(self) -> None:
    import time

    beat, seen = 0, {}
    while not self._stop.wait(self._interval_s):
      now = time.monotonic()
      try:
        beat += 1
        self._client.key_value_set(f"{self.PREFIX}/beat/{self._me}", str(beat), allow_overwrite=True)
        for peer in range(self._count):
          if peer == self._me or self._get(f"{self.PREFIX}/done/{peer}") is not None:
            continue
          value = self._get(f"{self.PREFIX}/beat/{peer}")
          if peer not in seen or seen[peer][0] != value:
            seen[peer] = (value, now)
          elif now - seen[peer][1] > self._timeout_s:
            self._on_lost(f"process {peer} of the job stopped responding for {self._timeout_s:g} s (it died, hung "
                          f"or lost the network)")
            return
      except Exception as e:  # pylint: disable=broad-except  (the coordinator itself is gone)
        if self._stop.is_set():
          return
        self._on_lost(f"lost the job's coordinator (process 0): {errors.first_line(e)}")
        return
