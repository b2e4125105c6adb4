"""Scores toy-world text-to-3D runs against the ground truth of their prompt, in 3D.

  python scripts/score_toy.py --workdir=runs/red_cube [--workdir=runs/blue_sphere ...]

For each run (a --workdir of scripts/train.py with configs/toy.py) it prints
`toy_score.score_scene`'s measures (the ones of tests/test_toy_e2e.py and the toy
benchmark, docs/toy_benchmark.md): silhouette IoU over 32 views at four elevations and
volumetric IoU against each toy shape, each with the own shape's margin over the best
other shape, the centre opacity seen from straight above (a torus's hole), and the
vocabulary colour nearest to the mean albedo with its distance from the prompt's colour.
--json prints the whole score as JSON instead.
"""

import json
import sys

from absl import app, flags, logging

from dreamfusion_jax import cli

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "A toy run's --workdir (repeatable).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_JSON = flags.DEFINE_bool("json", False, "Print each score as one line of JSON.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  from dreamfusion_jax import errors, runs, toy_score, toy_world

  for workdir in _WORKDIR.value:
    try:
      runs.check_run_dir(workdir, _STEP.value)
      config = runs.load_config(workdir)
      toy_world.parse_prompt(config.prompt)
      config, scene, params, step = runs.restore_scene(workdir, _STEP.value)
    except (errors.InputError, ValueError) as e:
      sys.exit(f"error: {workdir}: {e}")
    score = toy_score.score_scene(scene, params, config.prompt, level_mask=scene.level_mask(step))
    if _JSON.value:
      print(json.dumps({"workdir": workdir, "step": step, **score}))
    else:
      print(f"{workdir} step {step} {toy_score.summary_line(score)}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
