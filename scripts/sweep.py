"""Runs one training job per combination of config overrides, one after another.

  python scripts/sweep.py --config=configs/dreamfusion.py:small --workdir=runs/lr_sweep \
      --sweep="optim.lr=1e-2,5e-3" --sweep="guidance.guidance_scale=50,100" \
      --set="prompt=a hamburger"

Each run goes to <workdir>/<key=value,...>/ (resumed if it exists). --dry_run prints the
commands instead. Launch the printed commands on separate machines to run in parallel.
"""

import os
import shlex
import subprocess
import sys

from absl import app, flags

from dreamfusion_jax import sweep

_CONFIG = flags.DEFINE_string("config", None, "Config file (path[:variant]) for every run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "Axis key=v1,v2,... (repeat for a grid).")
_SET = flags.DEFINE_multi_string("set", [], "Override key=value applied to every run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  fixed = {}
  for spec in _SET.value:
    key, sep, value = spec.partition("=")
    if not sep:
      raise app.UsageError(f"--set must look like key=value; got {spec!r}")
    fixed[key] = value
  runs = sweep.grid(_SWEEP.value)
  train = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
  failed = []
  for i, overrides in enumerate(runs):
    workdir = os.path.join(_WORKDIR.value, sweep.run_name(overrides))
    cmd = [sys.executable, train, f"--config={_CONFIG.value}", f"--workdir={workdir}",
           *sweep.override_flags({**fixed, **overrides})]
    print(f"[{i + 1}/{len(runs)}] {shlex.join(cmd)}", flush=True)
    if not _DRY_RUN.value and subprocess.call(cmd) != 0:
      failed.append(workdir)
  if failed:
    print(f"{len(failed)} run(s) failed: {failed}")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
