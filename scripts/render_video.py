"""Renders a turntable video of a training run: rgb | normals | depth | opacity panels.

  python scripts/render_video.py --workdir=runs/hamburger
  python scripts/render_video.py --workdir=runs/hamburger --frames=60 --elevation=30 \
      --height=256 --width=256 --layers=rgb --save_frames

Writes <out_dir>/turntable.mp4 and .gif (and turntable_frames/*.png with --save_frames);
out_dir defaults to <workdir>/videos/step_<step>/. Camera defaults come from the run's
config.cameras.eval_* and the frame size from config.train.eval_height/width.
"""

import sys

from absl import app, flags, logging

from dreamfusion_jax import cli, errors, video

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_FRAMES = flags.DEFINE_integer("frames", 120, "Number of frames (one full turn).")
_ELEVATION = flags.DEFINE_float("elevation", None, "Camera elevation in degrees (default: eval_elevation_deg).")
_RADIUS = flags.DEFINE_float("radius", None, "Camera distance from the origin (default: eval_radius).")
_FOVY = flags.DEFINE_float("fovy", None, "Vertical field of view in degrees (default: eval_fovy_deg).")
_HEIGHT = flags.DEFINE_integer("height", None, "Frame height per panel (default: eval_height).")
_WIDTH = flags.DEFINE_integer("width", None, "Frame width per panel (default: eval_width).")
_LAYERS = flags.DEFINE_list("layers", list(video.VIDEO_LAYERS), "Panels, left to right.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Frames rendered per compiled call.")
_FPS = flags.DEFINE_integer("fps", 30, "Frames per second.")
_SAVE_FRAMES = flags.DEFINE_boolean("save_frames", False, "Also write every frame as a PNG.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (default: <workdir>/videos/step_<step>).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
  try:
    paths = video.render_run_turntable(
        _WORKDIR.value, step=_STEP.value, out_dir=_OUT_DIR.value, num_frames=_FRAMES.value,
        elevation_deg=_ELEVATION.value, radius=_RADIUS.value, fovy_deg=_FOVY.value, height=_HEIGHT.value,
        width=_WIDTH.value, layers=_LAYERS.value, batch_size=_BATCH_SIZE.value, fps=_FPS.value,
        save_frames=_SAVE_FRAMES.value)
  except (errors.InputError, ValueError) as e:  # a bad workdir, step, layer or size
    sys.exit(f"error: {e}")
  print(f"step {paths['step']}: wrote {paths['mp4']} and {paths['gif']}")
  if "frames" in paths:
    print(f"and {len(paths['frames'])} frames in {paths['frames'][0].rsplit('/', 1)[0]}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
