"""The toy benchmark: text-to-3D over toy prompts x seeds, scored in 3D (docs/toy_benchmark.md).

  python scripts/toy_benchmark.py --config=configs/toy.py --workdir=runs/toy_bench \
      [--prompts="a green torus,a yellow cone"] [--seeds=0,1] [--config.train.steps=200 ...]

One run per prompt and seed in <workdir>/<prompt>_seed<k>/ (rerun to resume: scored runs
are skipped, unfinished ones continue from their checkpoints). Prints the table of runs,
the untrained baseline and the summary, and writes <workdir>/toy_benchmark.md and .json.
Config overrides (--config.<path>=<value>) apply to every run; prompt and seed are set
per run.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dreamfusion_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs and the tables.")
_PROMPTS = flags.DEFINE_list("prompts", None, "Comma-separated toy prompts (default: all 16).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Comma-separated seeds.")
_CACHE = flags.DEFINE_string("compilation_cache", None,
                             "JAX persistent compilation cache directory (default: <workdir>/.jax_cache).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
  cli.apply_cpu_xla_flags()  # what training runs with (docs/performance.md); before JAX starts
  from dreamfusion_jax import guidance, toy_world

  prompts = _PROMPTS.value or [p for p, _, _ in toy_world.all_prompts()]
  for p in prompts:
    try:
      toy_world.parse_prompt(p)
    except ValueError as e:
      raise app.UsageError(f"--prompts: {e}") from e
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError as e:
    raise app.UsageError(f"--seeds must be integers; got {_SEEDS.value}") from e

  import jax

  jax.config.update("jax_compilation_cache_dir", _CACHE.value or os.path.join(_WORKDIR.value, ".jax_cache"))
  from dreamfusion_jax import errors, toy_benchmark

  try:
    result = toy_benchmark.run_benchmark(_CONFIG.value, _WORKDIR.value, prompts=prompts, seeds=seeds)
  except (errors.InputError, guidance.ModelNotFoundError, toy_benchmark.WorkdirError) as e:
    sys.exit(f"error: {e}")
  except toy_benchmark.RunStopped as e:
    sys.exit(f"stopped: {e}")
  md, js = toy_benchmark.write_tables(result, _WORKDIR.value)
  print(toy_benchmark.format_markdown(result))
  print(f"tables: {md} {js}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
