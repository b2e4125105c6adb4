"""Renders a toy object from a chosen view to a PNG: the input of toy image-to-3D.

  python scripts/toy_image.py --prompt="a red cube" --elevation=15 --azimuth=0 --out=cube.png
  python scripts/train.py --config=configs/toy_zero123.py --config.image=cube.png \
      --config.reference.elevation_deg=15 --config.reference.azimuth_deg=0 --workdir=runs/cube_from_image

The PNG is RGBA: the object's colour (albedo unless --shading=lambertian, lit from the
camera) with its opacity as alpha. The defaults (radius 1.7, fovy 45) are
configs/toy_zero123.py's config.reference defaults; pass any other view to both.
"""

import sys

from absl import app, flags, logging

from dreamfusion_jax import cli

_PROMPT = flags.DEFINE_string("prompt", None, "A toy object: 'a <colour> <shape>', e.g. 'a green torus'.")
_ELEVATION = flags.DEFINE_float("elevation", 15.0, "Camera elevation in degrees, in [-90, 90].")
_AZIMUTH = flags.DEFINE_float("azimuth", 0.0, "Camera azimuth in degrees (0: from +x, 90: from +y).")
_RADIUS = flags.DEFINE_float("radius", 1.7, "Camera distance from the object's centre.")
_FOVY = flags.DEFINE_float("fovy", 45.0, "Vertical field of view in degrees.")
_SIZE = flags.DEFINE_integer("size", 128, "Image side in pixels.")
_SHADING = flags.DEFINE_enum("shading", "albedo", ["albedo", "lambertian"], "How the object is shaded.")
_OUT = flags.DEFINE_string("out", None, "The PNG to write.")
flags.mark_flags_as_required(["prompt", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from dreamfusion_jax import images, toy_world

  problems = []
  try:
    toy_world.parse_prompt(_PROMPT.value)
  except ValueError as e:
    problems.append(f"--prompt: {e}")
  if not -90.0 <= _ELEVATION.value <= 90.0:
    problems.append(f"--elevation={_ELEVATION.value} must lie in [-90, 90]")
  if _RADIUS.value <= 1.0:
    problems.append(f"--radius={_RADIUS.value} must be > 1 (the objects fill the unit sphere)")
  if not 0.0 < _FOVY.value < 180.0:
    problems.append(f"--fovy={_FOVY.value} must lie inside (0, 180)")
  if _SIZE.value < 8:
    problems.append(f"--size={_SIZE.value} must be >= 8")
  if not _OUT.value.lower().endswith(".png"):
    problems.append(f"--out={_OUT.value!r} must name a .png file")
  if problems:
    sys.exit("error: " + "; ".join(problems))
  rgb, opacity = toy_world.render_view(_PROMPT.value, elevation_deg=_ELEVATION.value, azimuth_deg=_AZIMUTH.value,
                                       radius=_RADIUS.value, fovy_deg=_FOVY.value, size=_SIZE.value,
                                       shading=_SHADING.value)
  images.save_png(_OUT.value, images.premultiplied_to_rgba(rgb, opacity))
  print(f"{_OUT.value}: {_PROMPT.value} from elevation {_ELEVATION.value:g}, azimuth {_AZIMUTH.value:g}, "
        f"radius {_RADIUS.value:g}, fovy {_FOVY.value:g} ({_SIZE.value}x{_SIZE.value} RGBA)")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
