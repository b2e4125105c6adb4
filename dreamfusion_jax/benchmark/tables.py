"""The benchmark's printed tables: components, scaling, the FLOP model, the report."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from dreamfusion_jax.benchmark.measurement import Measurement

# Row labels of the components (step_parts.COMPONENTS).
DESCRIPTIONS = {
    "train_step": "full train step",
    "render_fwd_bwd": "render fwd+bwd",
    "vae_encode_fwd_bwd": "VAE encode fwd+bwd",
    "unet_cfg_fwd": "UNet CFG fwd (2B)",
    "text_encoder": "text encoder (once)",
}


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table: columns as wide as their widest cell, numbers right-aligned,
  text left-aligned, a rule under the header."""
  cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
  numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(header))]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

  def line(r):
    return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

  return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _is_number(v) -> bool:
  return v is None or isinstance(v, (int, float, np.number)) or (isinstance(v, str) and v in ("n/a", "-"))


def _cell(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
  return str(v)


def _ms(seconds: Optional[float]) -> Optional[float]:
  return None if seconds is None else round(seconds * 1e3, 2)


def _mib(num_bytes: Optional[int]) -> Optional[float]:
  return None if num_bytes is None else round(num_bytes / 2**20, 2)


def component_table(results: dict[str, Measurement], peaks: dict[str, float],
                    reference_s: Optional[dict[str, tuple[float, float]]] = None) -> str:
  """The main table: per component median/min time, GFLOP, GFLOP/s, MFU, compile time,
  temp memory, and (with a reference) its median time and the JAX/reference ratios of
  the medians and of the minima (the minima resist a busy machine better).

  Args:
    results: name -> Measurement.
    peaks: dtype name -> peak FLOP/s (the matmul peak).
    reference_s: name -> (median, min) seconds of the PyTorch reference.
  """
  header = ["component", "median ms", "min ms", "GFLOP", "GFLOP/s", "MFU %", "compile s", "temp MiB"]
  if reference_s is not None:
    header += ["torch ms", "jax/torch", "(min)"]
  rows = []
  for name, m in results.items():
    mfu = m.mfu(peaks.get(m.dtype))
    row = [DESCRIPTIONS.get(name, name), _ms(m.median_s), _ms(m.min_s),
           None if m.flops is None else round(m.flops / 1e9, 3),
           None if m.flops_per_s is None else round(m.flops_per_s / 1e9, 2),
           None if mfu is None else round(100 * mfu, 1),
           None if m.compile_s is None else round(m.compile_s, 1), _mib(m.temp_bytes)]
    if reference_s is not None:
      ref = reference_s.get(name)
      row += [None, None, None] if ref is None else [_ms(ref[0]), round(m.median_s / ref[0], 2),
                                                     round(m.min_s / ref[1], 2)]
    rows.append(row)
  return format_table(header, rows)


def scaling_table(rows: Sequence[dict]) -> str:
  """Step time per render setting, with the growth relative to the first row (the
  config's own settings)."""
  if not rows:
    return ""
  first = rows[0]["median_s"]
  body = [[f"{r['height']}x{r['width']}", r["num_samples"], r["points"], _ms(r["median_s"]),
           round(r["median_s"] / first, 2), None if r["flops"] is None else round(r["flops"] / 1e9, 3),
           round(r["compile_s"], 1)] for r in rows]
  return format_table(["render", "samples", "points", "step ms", "x config", "GFLOP", "compile s"], body)


def flop_model_table(flops: dict[str, Optional[float]], *, peak_tflops: float = 989.0,
                     mfus: Sequence[float] = (1.0, 0.4)) -> str:
  """The FLOP model as a table, plus the time per iteration at `peak_tflops` (H100 SXM
  dense bfloat16 by default) for each MFU in `mfus`. The text encoder runs once per
  run and is not part of an iteration."""
  per_iteration = sum(v for k, v in flops.items() if k != "text_encoder" and v is not None)
  rows = [[DESCRIPTIONS.get(k, k), None if v is None else round(v / 1e12, 3)] for k, v in flops.items()]
  rows.append(["per iteration (without the text encoder)", round(per_iteration / 1e12, 3)])
  lines = [format_table(["part", "TFLOP"], rows), ""]
  for mfu in mfus:
    ms = per_iteration / (peak_tflops * 1e12 * mfu) * 1e3
    lines.append(f"at {peak_tflops:g} TFLOP/s and {100 * mfu:g} % MFU: {ms:.1f} ms per iteration")
  return "\n".join(lines)


def report(result: dict) -> str:
  """The printed summary of a `run_benchmark` result: settings, the component table
  (with the reference columns when present), the peaks, the scaling table."""
  s = result["settings"]
  lines = [f"device: {result['device']}   jax {result['jax_version']}",
           f"model: {result['model']}",
           f"render {s['height']}x{s['width']}, {s['num_samples']} samples/ray, batch {s['batch_size']} per device "
           f"x {s['num_devices']} devices, guidance image {s['image_size']}, {s['guidance_dtype']}, "
           f"remat {s['remat']}; median of {s['repeats']} runs", ""]
  results = {name: Measurement(name=name, times_s=tuple(m["times_s"]), compile_s=m["compile_s"], flops=m["flops"],
                               temp_bytes=m["temp_bytes"], dtype=m["dtype"])
             for name, m in result["components"].items()}
  reference = result.get("reference")
  lines.append(component_table(results, result["peak_flops_per_s"], None if reference is None else
                               {k: (v["median_s"], v["min_s"]) for k, v in reference.items()}))
  peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in result["peak_flops_per_s"].items())
  n = result.get("peak_matmul_size", 2048)
  lines += ["", f"matmul peak ({n}^3 jnp.dot on this device): {peaks}; MFU % is against it"]
  peak_mem = result["device_peak_bytes"]
  lines.append("device peak memory: " + ("n/a (the backend reports none)" if peak_mem is None
                                         else f"{peak_mem / 2**20:.1f} MiB"))
  if reference is not None:
    ratio = result["ratio_jax_over_reference"].get("train_step")
    lines.append(f"train step JAX/PyTorch: {ratio:.2f} (medians; < 1: JAX faster), torch threads "
                 f"{result.get('reference_threads')}")
  for note in result["notes"]:
    lines.append(f"note: {note}")
  if result.get("scaling"):
    lines += ["", "train step vs render size and samples per ray:", scaling_table(result["scaling"])]
  return "\n".join(lines)
