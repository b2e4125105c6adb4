"""The whole benchmark: a model, the step and its parts timed, the matmul peak,
optionally the PyTorch reference and the scaling sweep; one JSON-serialisable dict."""

from __future__ import annotations

import copy
import pathlib
import statistics
import tempfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from dreamfusion_jax import train
from dreamfusion_jax.benchmark.measurement import device_peak_bytes, matmul_peak
from dreamfusion_jax.benchmark.sd21 import (SD21_TEXT_ENCODER_CONFIG, SD21_UNET_CONFIG, SD21_VAE_CONFIG,
                                            sd21_shaped_guidance)
from dreamfusion_jax.benchmark.step_parts import build_step_parts, measure_components, measure_scaling
from dreamfusion_jax.guidance.priors import stable_diffusion as sd
from dreamfusion_jax.guidance import tiny


def run_benchmark(
    config: ml_collections.ConfigDict,
    *,
    model: Optional[str] = None,
    repeats: int = 20,
    scaling: bool = False,
    scaling_repeats: int = 3,
    bf16: bool = False,
    remat: bool = False,
    sd21_shapes: bool = False,
    reference_factory: Optional[Callable[..., Any]] = None,
    workdir: Optional[str] = None,
    metadata: Optional[dict] = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
  """Measures the step, its parts, the matmul peak, optionally the PyTorch reference and
  the scaling sweep. Returns a JSON-serialisable dict (see `report` for the tables).

  Args:
    config: the experiment config (e.g. configs/dreamfusion.py:tiny); not modified.
    model: a diffusers-layout directory, or None / "tiny" for a tiny random Stable
      Diffusion written (PyTorch safetensors, readable by both sides) under `workdir`.
    bf16: guidance weights and activations in bfloat16 (config.guidance.dtype).
    remat: jax.checkpoint around the render in the render row only (the train step
      has no remat setting; docs/performance.md).
    sd21_shapes: SD-2.1-base-shaped UNet/VAE/CLIP with random weights instead of a
      model directory (needs a config with guidance.image_size a multiple of 64).
    reference_factory: called as f(config, model_dir or None, scene_params,
      configs=...) -> an object with `time_components(repeats, log=...)` returning
      name -> seconds per call (benchmarks/torch_reference.TorchReference).
    workdir: where the tiny model is written (default: a temporary directory).
    metadata: extra entries for the result (the script records XLA_FLAGS and the
      machine's load average).
  """
  config = copy.deepcopy(config)
  notes = []
  if bf16:
    config.guidance.dtype = "bfloat16"
  if remat:
    notes.append("remat: only the render row is rematerialised (jax.checkpoint in the benchmark); the train step "
                 "has no remat setting (docs/performance.md)")
  train.validate_config(config)
  devices = jax.local_devices()
  tmp = None
  model_dir = None
  if sd21_shapes:
    if config.guidance.image_size % 64:
      raise train.ConfigError(f"--sd21_shapes needs config.guidance.image_size a multiple of 64 (VAE x UNet "
                              f"downsampling), got {config.guidance.image_size}: use "
                              "--config=configs/dreamfusion.py (512)")
    log("building SD-2.1-base-shaped models with random weights")
    guidance_and_params = sd21_shaped_guidance(sd.settings_from_config(config.guidance), dtype=config.guidance.dtype)
    model_desc = guidance_and_params[0].model
  else:
    if model in (None, "", "tiny"):
      tmp = tempfile.TemporaryDirectory() if workdir is None else None
      model_dir = str(tiny.build_tiny_pipeline_dir(pathlib.Path(workdir or tmp.name) / "tiny_sd", fmt="safetensors"))
      model_desc = "tiny random Stable Diffusion (guidance/tiny.py)"
    else:
      model_dir = model_desc = model
    config.guidance.model = model_dir
    log(f"loading {model_dir}")
    guidance_and_params = sd.from_config(config.guidance)

  parts = build_step_parts(config, guidance_and_params=guidance_and_params, num_devices=len(devices))
  scene_params = jax.device_get(parts.state.params)  # before any donation
  log("matmul peak")
  # 2048^3 fills a CPU; an accelerator needs 8192^3 (an H100 reached 133 of its ~989
  # bf16 TFLOP/s at 2048^3).
  n = 2048 if devices[0].platform == "cpu" else 8192
  peaks = {"float32": matmul_peak(n, dtype=jnp.float32, device=devices[0])}
  if config.guidance.dtype == "bfloat16":
    peaks["bfloat16"] = matmul_peak(n, dtype=jnp.bfloat16, device=devices[0])
  # The best of the runs: a peak is what the device can do, and other processes only slow it.
  peak_rates = {k: m.flops / m.min_s for k, m in peaks.items()}
  results = measure_components(parts, repeats=repeats, remat=remat, devices=devices, log=log)
  out = {
      "device": f"{devices[0].platform}: {devices[0].device_kind} x{len(devices)}",
      "jax_version": jax.__version__,
      "model": model_desc,
      "settings": {"height": config.render.height, "width": config.render.width,
                   "num_samples": config.render.num_samples, "batch_size": config.train.batch_size,
                   "num_devices": len(devices), "image_size": config.guidance.image_size,
                   "guidance_dtype": config.guidance.dtype, "remat": remat, "repeats": repeats},
      "peak_flops_per_s": peak_rates,
      "peak_matmul": {k: m.to_json() for k, m in peaks.items()},
      "peak_matmul_size": n,
      "components": {k: m.to_json(peak_rates.get(m.dtype)) for k, m in results.items()},
      "device_peak_bytes": device_peak_bytes(devices[0]),
      "notes": notes,
      **(metadata or {}),
  }
  if reference_factory is not None:
    log("PyTorch reference")
    configs = None
    if sd21_shapes:
      configs = {"unet": SD21_UNET_CONFIG, "vae": SD21_VAE_CONFIG, "text_encoder": SD21_TEXT_ENCODER_CONFIG}
    reference = reference_factory(config, model_dir, scene_params, configs=configs)
    out["reference_threads"] = getattr(reference, "num_threads", None)
    times = reference.time_components(repeats, log=log)
    out["reference"] = {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": list(t)}
                        for name, t in times.items()}
    out["ratio_jax_over_reference"] = {name: results[name].median_s / out["reference"][name]["median_s"]
                                       for name in results if name in out["reference"]}
  if scaling:
    out["scaling"] = measure_scaling(parts, repeats=scaling_repeats, log=log)
  if tmp is not None:
    tmp.cleanup()
  return out
