"""Timing a compiled JAX function and reading XLA's costs of it.

`measure` compiles a jitted (or pmapped) function for its arguments (timed), reads
XLA's cost analysis (FLOPs per call) and memory analysis (temporary bytes), then
times `repeats` calls after warm-up, each ended with `jax.block_until_ready`.
`matmul_peak` times a large matmul: the practical FLOP/s peak that MFU divides by.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Measurement:
  """Timings and static costs of one compiled function.

  Attributes:
    name: what was timed (one of COMPONENTS, or free text).
    times_s: wall-clock seconds of each timed call (after warm-up).
    compile_s: seconds to trace, lower and compile (None if not compiled here).
    flops: floating-point operations per call from XLA's cost analysis (None if the
      backend gives none).
    temp_bytes: the compiled program's temporary buffers (None if not reported).
    dtype: the dtype the bulk of the FLOPs run in, to pick the matching peak.
  """

  name: str
  times_s: tuple[float, ...]
  compile_s: Optional[float] = None
  flops: Optional[float] = None
  temp_bytes: Optional[int] = None
  dtype: str = "float32"

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    return min(self.times_s)

  @property
  def flops_per_s(self) -> Optional[float]:
    return None if self.flops is None else self.flops / self.median_s

  def mfu(self, peak_flops_per_s: Optional[float]) -> Optional[float]:
    """Achieved FLOP/s as a fraction of `peak_flops_per_s` (None if either is unknown)."""
    if self.flops_per_s is None or not peak_flops_per_s:
      return None
    return self.flops_per_s / peak_flops_per_s

  def to_json(self, peak_flops_per_s: Optional[float] = None) -> dict:
    return {"name": self.name, "median_s": self.median_s, "min_s": self.min_s, "runs": len(self.times_s),
            "times_s": list(self.times_s), "compile_s": self.compile_s, "flops": self.flops,
            "flops_per_s": self.flops_per_s, "mfu": self.mfu(peak_flops_per_s), "temp_bytes": self.temp_bytes,
            "dtype": self.dtype}


def cost_flops(compiled_or_lowered) -> Optional[float]:
  """FLOPs of a compiled (or lowered) XLA program from its cost analysis.

  jax returns a dict (jax 0.10 on CPU), a list with one dict per program (older
  versions, some backends) or None; the list's entries are summed.
  """
  try:
    analysis = compiled_or_lowered.cost_analysis()
  except (NotImplementedError, RuntimeError, ValueError):  # some backends/pmap lowerings have none
    return None
  if analysis is None:
    return None
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = [a.get("flops") for a in analysis if a]
  flops = [f for f in flops if f is not None and f >= 0]
  return float(sum(flops)) if flops else None


def temp_bytes(compiled) -> Optional[int]:
  """Temporary buffer bytes of a compiled program (XLA's memory analysis), if known."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None
  if stats is None:
    return None
  return int(getattr(stats, "temp_size_in_bytes", 0))


def device_peak_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
  """The device's high-water mark of allocated bytes, or None (CPU reports nothing)."""
  stats = (device or jax.local_devices()[0]).memory_stats()
  if not stats:
    return None
  return stats.get("peak_bytes_in_use")


def time_calls(fn: Callable, args: Sequence, *, repeats: int, warmup: int = 2,
               thread_first: bool = False) -> tuple[float, ...]:
  """Wall-clock seconds of `repeats` calls fn(*args), each ended by block_until_ready.

  Args:
    fn: a compiled or jitted function.
    thread_first: feed output[0] back as the first argument (a train step's state,
      which may be donated).
  """
  args = list(args)
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - start)
    if thread_first:
      args[0] = out[0]
  return tuple(times)


def measure(name: str, fn: Callable, args: Sequence, *, repeats: int, warmup: int = 2, thread_first: bool = False,
            dtype: str = "float32") -> Measurement:
  """Compiles `fn` (a jax.jit or jax.pmap function) for `args` (timed), reads its cost
  and memory analyses, then times `repeats` calls of the compiled program.

  FLOPs come from the lowered program (before XLA's backend passes): on GPUs the
  compiled program's convolutions are cuDNN custom calls that XLA's cost analysis
  does not count (an H100 run reported 0.37 TFLOP for a 3.86 TFLOP SD-2.1 step); the
  lowered count is the same on every backend, and on the CPU it equals the compiled one.
  """
  start = time.perf_counter()
  lowered = fn.lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  times = time_calls(compiled, args, repeats=repeats, warmup=warmup, thread_first=thread_first)
  flops = cost_flops(lowered)
  return Measurement(name=name, times_s=times, compile_s=compile_s,
                     flops=flops if flops is not None else cost_flops(compiled),
                     temp_bytes=temp_bytes(compiled), dtype=dtype)


def matmul_peak(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 10,
                device: Optional[jax.Device] = None) -> Measurement:
  """A large square matmul on `device`: its FLOP/s (at the fastest run) is the peak the
  MFU column divides by.

  Returns:
    Measurement named "matmul_<n>_<dtype>" with flops = 2 n^3.
  """
  device = device or jax.local_devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype), device)
  b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype), device)
  m = measure(f"matmul_{n}_{jnp.dtype(dtype).name}", jax.jit(jnp.dot), (a, b), repeats=repeats,
              dtype=jnp.dtype(dtype).name)
  return dataclasses.replace(m, flops=2.0 * n**3)  # exact; XLA may report the same or omit it
