"""Text-to-3D: optimise a NeRF with Score Distillation Sampling.

  python scripts/train.py --config=configs/dreamfusion.py \
      --config.prompt="a hamburger" --config.optim.lr=1e-2 --workdir=runs/hamburger

Any config field can be overridden with --config.<path>=<value>; unknown fields and
values of the wrong type are rejected. Rerunning with the same --workdir resumes from
its latest checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dreamfusion_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, renders, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax and JAX log every save and backend probe at INFO
  config = _CONFIG.value
  added = cli.apply_cpu_xla_flags()  # before JAX starts its backend
  if added:
    print(f"XLA_FLAGS += {' '.join(added)} (CPU compile settings, docs/performance.md; set the flag in XLA_FLAGS to "
          f"override)")
  from dreamfusion_jax import distributed, errors, guidance, train

  def lost(message):  # from the watchdog's thread while the main one waits in a collective
    print(f"\nerror: {message}; restart every process with the same command to resume from the newest "
          f"checkpoint", file=sys.stderr, flush=True)
    os._exit(1)  # skip jax.distributed's shutdown barrier: it would wait for the lost process

  try:
    if config.distributed:
      distributed.initialize(config.cluster)
    with distributed.PeerWatchdog(lost, timeout_s=config.cluster.peer_timeout_s):
      train.train_and_evaluate(config, _WORKDIR.value)
  except (errors.InputError, guidance.ModelNotFoundError) as e:
    # Errors about the user's input: the message says what to change; a traceback would not help.
    # Exit at once: nothing is being written (bad input stops a run before it writes), and
    # a failed checkpoint read leaves orbax's asyncio tasks to print tracebacks at interpreter exit.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  except distributed.PeerLostError as e:
    lost(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
