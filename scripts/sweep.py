"""Runs a grid of config overrides: one multi-scene job per group of runs that differ
only in prompt, seed, optim.lr, guidance scale or regularizer weights
(dreamfusion_jax/multiscene.py: one compiled step, the guidance weights shared),
separate jobs for everything else.

  python scripts/sweep.py --config=configs/toy.py --workdir=runs/toy_sweep \
      --sweep="prompt=a red cube,a blue sphere" --sweep="seed=0,1"        # one job, 4 scenes
  python scripts/sweep.py --config=configs/dreamfusion.py:small --workdir=runs/lr_sweep \
      --sweep="optim.lr=1e-2,5e-3" --sweep="render.num_samples=64,128" \
      --set="prompt=a hamburger"                                           # 2 jobs of 2 scenes

Each run goes to <workdir>/<key=value,...>/, an ordinary run directory (resumed if it
exists; scripts/train.py can resume it alone). --separate_jobs runs one scripts/train.py
per run instead (one after another); --dry_run prints the jobs and runs nothing.
"""

import os
import shlex
import subprocess
import sys

from absl import app, flags

from dreamfusion_jax import cli, sweep

_CONFIG = flags.DEFINE_string("config", None, "Config file (path[:variant]) for every run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "Axis key=v1,v2,... (repeat for a grid).")
_SET = flags.DEFINE_multi_string("set", [], "Override key=value applied to every run.")
_SEPARATE = flags.DEFINE_bool("separate_jobs", False, "One scripts/train.py process per run, even where the "
                              "runs could share a multi-scene job.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the jobs, run nothing.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  fixed = {}
  for spec in _SET.value:
    key, sep, value = spec.partition("=")
    if not sep:
      raise app.UsageError(f"--set must look like key=value; got {spec!r}")
    fixed[key] = value
  try:
    grid = sweep.grid(_SWEEP.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  jobs = [[r] for r in grid] if _SEPARATE.value else sweep.groups(grid, sweep.SCENE_FIELDS)
  train = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
  failed = []
  for i, job in enumerate(jobs):
    names = [sweep.run_name(r) for r in job]
    if len(job) == 1:
      workdir = os.path.join(_WORKDIR.value, names[0])
      cmd = [sys.executable, train, f"--config={_CONFIG.value}", f"--workdir={workdir}",
             *sweep.override_flags({**fixed, **job[0]})]
      print(f"[job {i + 1}/{len(jobs)}] {shlex.join(cmd)}", flush=True)
      if not _DRY_RUN.value and subprocess.call(cmd) != 0:
        failed.append(workdir)
      continue
    print(f"[job {i + 1}/{len(jobs)}] {len(job)} scenes in one job: " + "; ".join(names), flush=True)
    if _DRY_RUN.value:
      continue
    if not _train_scenes(job, fixed, names):
      failed += [os.path.join(_WORKDIR.value, n) for n in names]
  if failed:
    print(f"{len(failed)} run(s) failed: {failed}")
    sys.exit(1)


def _train_scenes(job, fixed, names) -> bool:
  cli.apply_cpu_xla_flags()
  from dreamfusion_jax import errors, multiscene

  try:
    base = sweep.load_config_file(_CONFIG.value)
    configs = [sweep.scene_config(base, {**fixed, **overrides}) for overrides in job]
    multiscene.train_scenes(configs, _WORKDIR.value, names)
  except (ValueError, errors.InputError) as e:
    print(f"error: {errors.first_line(e)}", flush=True)
    return False
  return True


if __name__ == "__main__":
  app.run(main)
