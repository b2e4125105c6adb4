"""Performance of the DreamFusion train step: timing, XLA cost analysis, tables.

What one SDS iteration costs, measured on the current JAX device:

  * the full train step (`train.train_step` jitted with axis_name=None on one device,
    or the pmapped step on all local devices), and separately its parts: the render
    forward+backward, the VAE encoder forward+backward, the classifier-free-guided
    UNet forward (one call on the doubled batch) and the text encoder (run once per
    prompt, not per step);
  * FLOPs per call from XLA's cost analysis of the compiled program, achieved FLOP/s,
    and the fraction of a measured matmul peak on the same device (MFU);
  * compile time, compiled temporary memory, and the device's peak memory where the
    backend reports it (CPU does not);
  * step time against render resolution and samples per ray (`scaling`).

One module per job:

  measurement.py  timing a compiled function, XLA's FLOP and memory analyses, the
                  matmul peak (`Measurement`, `measure`, `cost_flops`).
  step_parts.py   the step and its parts built once (`build_step_parts`) and each
                  part as (jitted function, arguments); `measure_components`,
                  `measure_scaling`.
  sd21.py         SD-2.1-base's configs and a guidance of its shapes with random
                  weights (full size, nothing downloaded).
  flop_model.py   FLOPs of a full-size iteration from lowered programs, nothing run.
  tables.py       the printed tables and `report`.
  run.py          `run_benchmark`: all of the above for one config, as a dict.

Every timing is the median of `repeats` calls after warm-up, each call ended with
`jax.block_until_ready`. Frozen weights are arguments of every timed function (never
constants), as in training. `scripts/benchmark.py` is the command line;
`docs/performance.md` has the FLOP model of a full-size (SD-2.1-base) iteration.
"""

from dreamfusion_jax.benchmark.flop_model import render_flops, sd21_flop_model
from dreamfusion_jax.benchmark.measurement import (Measurement, cost_flops, device_peak_bytes, matmul_peak, measure,
                                                   temp_bytes, time_calls)
from dreamfusion_jax.benchmark.run import run_benchmark
from dreamfusion_jax.benchmark.sd21 import (SD21_SCHEDULER_CONFIG, SD21_TEXT_ENCODER_CONFIG, SD21_UNET_CONFIG,
                                            SD21_VAE_CONFIG, sd21_shaped_guidance)
from dreamfusion_jax.benchmark.step_parts import (COMPONENTS, StepParts, build_step_parts, measure_components,
                                                  measure_scaling, render_fwd_bwd_fn, text_encoder_fn, train_step_fn,
                                                  unet_cfg_fwd_fn, vae_encode_fwd_bwd_fn)
from dreamfusion_jax.benchmark.tables import (DESCRIPTIONS, component_table, flop_model_table, format_table, report,
                                              scaling_table)
from dreamfusion_jax.guidance.sd_models import random_params

__all__ = [
    "COMPONENTS", "DESCRIPTIONS", "Measurement", "SD21_SCHEDULER_CONFIG", "SD21_TEXT_ENCODER_CONFIG",
    "SD21_UNET_CONFIG", "SD21_VAE_CONFIG", "StepParts", "build_step_parts", "component_table", "cost_flops",
    "device_peak_bytes", "flop_model_table", "format_table", "matmul_peak", "measure", "measure_components",
    "measure_scaling", "random_params", "render_flops", "render_fwd_bwd_fn", "report", "run_benchmark",
    "scaling_table", "sd21_flop_model", "sd21_shaped_guidance", "temp_bytes", "text_encoder_fn", "time_calls",
    "train_step_fn", "unet_cfg_fwd_fn", "vae_encode_fwd_bwd_fn",
]
