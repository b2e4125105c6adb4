"""Scores toy-world text-to-3D runs against the ground truth of their prompt.

  python scripts/score_toy.py --workdir=runs/red_cube [--workdir=runs/blue_sphere ...]

For each run (a --workdir of scripts/train.py with configs/toy.py) it renders 8 views
around the object and prints the silhouette IoU against each toy shape's ground truth
from the same views, and the vocabulary colour nearest to the object's mean albedo
(`toy_world.score_scene`, the measure of tests/test_toy_e2e.py).
"""

import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "A toy run's --workdir (repeatable).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  from dreamfusion_jax import errors, runs, toy_world

  for workdir in _WORKDIR.value:
    try:
      config, scene, params, step = runs.restore_scene(workdir, _STEP.value)
    except errors.InputError as e:
      sys.exit(f"error: {e}")
    try:
      toy_world.parse_prompt(config.prompt)
    except ValueError as e:
      raise app.UsageError(f"{workdir}: {e}") from e
    score = toy_world.score_scene(scene, params, config.prompt, level_mask=scene.level_mask(step))
    ious = " ".join(f"{s}={v:.3f}" for s, v in score["iou_by_shape"].items())
    print(f"{workdir} step {step} {config.prompt!r}: IoU({score['prompt_shape']})={score['iou']:.3f} "
          f"[{ious}] colour={score['color']} (prompt {score['prompt_color']}) "
          f"mean_rgb={json.dumps([round(v, 3) for v in score['mean_rgb']])}")


if __name__ == "__main__":
  app.run(main)
