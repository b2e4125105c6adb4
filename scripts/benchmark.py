"""Times the DreamFusion train step and its parts; optionally against PyTorch.

  python scripts/benchmark.py                                  # tiny config, tiny random SD
  python scripts/benchmark.py --torch --json=bench.json        # + the PyTorch reference
  python scripts/benchmark.py --scaling                        # + step time vs resolution/samples
  python scripts/benchmark.py --config=configs/dreamfusion.py --sd21_shapes   # full size (GPU/TPU)
  python scripts/benchmark.py --config=configs/dreamfusion.py --sd21_flop_model  # FLOPs only, any machine

See dreamfusion_jax/benchmark/ for what is measured and docs/performance.md for
how to read it.
"""

import functools
import json
import os
import sys

from absl import app, flags, logging

from dreamfusion_jax import cli
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs/dreamfusion.py:tiny"),
                                          "Experiment config (path[:variant]).", lock_config=False)
_MODEL = flags.DEFINE_string("model", "tiny", "Diffusers-layout directory, or 'tiny': a tiny random Stable "
                             "Diffusion written to a temporary directory.")
_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per component (median reported).")
_SCALING = flags.DEFINE_bool("scaling", False, "Also time the step at render sizes 32/64/128 and 16/32/64 "
                             "samples per ray.")
_SCALING_REPEATS = flags.DEFINE_integer("scaling_repeats", 3, "Timed calls per scaling setting.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch reference (benchmarks/torch_reference.py) and "
                           "report JAX/PyTorch.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads for the reference; default: "
                                      "the cores this process may use (as XLA). On a busy machine 1 is far less "
                                      "distorted: OpenMP barriers stall when a thread is descheduled.")
_BF16 = flags.DEFINE_bool("bf16", False, "Guidance weights and activations in bfloat16.")
_REMAT = flags.DEFINE_bool("remat", False, "jax.checkpoint around the renderer.")
_FLOP_MODEL = flags.DEFINE_bool("sd21_flop_model", False, "Only print the FLOP model of one SD-2.1-base SDS "
                                "iteration (XLA cost analysis of the lowered programs, nothing run) at the "
                                "config's batch and render settings, and exit.")
_SD21 = flags.DEFINE_bool("sd21_shapes", False, "SD-2.1-base-shaped models with random weights (no download); "
                          "use with --config=configs/dreamfusion.py (image_size 512).")


def _reference_factory():
  """benchmarks.torch_reference.TorchReference (imported only when asked for)."""
  sys.path.insert(0, REPO)
  try:
    from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    sys.exit(f"error: --torch needs PyTorch ({e}); pip install -e '.[benchmark]'")
  return functools.partial(torch_reference.TorchReference, num_threads=_TORCH_THREADS.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  cli.apply_cpu_xla_flags()  # what training runs with (docs/performance.md); before JAX starts
  from dreamfusion_jax import benchmark, guidance, train  # pylint: disable=g-import-not-at-top

  if _FLOP_MODEL.value:
    config = _CONFIG.value
    flops = benchmark.sd21_flop_model(batch_size=config.train.batch_size, render_config=config)
    print(f"SD-2.1-base, 512x512, batch {config.train.batch_size}, render {config.render.height}x"
          f"{config.render.width} at {config.render.num_samples} samples per ray:")
    print(benchmark.flop_model_table(flops))
    return
  factory = _reference_factory() if _TORCH.value else None
  load = os.getloadavg()[0]
  if load > 0.5:
    # Other processes on the cores distort every timing; PyTorch's OpenMP barriers
    # worst of all (a descheduled thread stalls each op for a scheduler time slice).
    print(f"warning: load average {load:.1f} before starting: timings will be noisy", flush=True)
  metadata = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_start": load}
  try:
    result = benchmark.run_benchmark(
        _CONFIG.value, model=_MODEL.value, repeats=_REPEATS.value, scaling=_SCALING.value,
        scaling_repeats=_SCALING_REPEATS.value, bf16=_BF16.value, remat=_REMAT.value, sd21_shapes=_SD21.value,
        reference_factory=factory, metadata=metadata, log=lambda msg: print(f"... {msg}", flush=True))
  except (train.ConfigError, guidance.ModelNotFoundError) as e:
    sys.exit(f"error: {e}")
  result["load_average_end"] = os.getloadavg()[0]
  print()
  print(benchmark.report(result))
  print(f"load average: {result['load_average_start']:.1f} at start, {result['load_average_end']:.1f} at end; "
        f"XLA_FLAGS={result['xla_flags']!r}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)
    print(f"\nwrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
