"""Exports a training run's field as a mesh (marching cubes on the density).

  python scripts/export.py --workdir=runs/hamburger                        # GLB, UV texture
  python scripts/export.py --workdir=runs/hamburger --notexture            # GLB, vertex colours
  python scripts/export.py --workdir=runs/hamburger --format=obj --target_faces=50000  # OBJ + MTL + PNG
  python scripts/export.py --workdir=runs/hamburger --step=5000 --threshold=10 --out=burger.ply

GLB and OBJ are written +Y up (glTF's convention), PLY in the run's +z-up world. The
default threshold is the density at which one render-sample step is half opaque,
ln 2 * num_samples / (2 * bound) (22.2 for the default config); see docs/export.md.
"""

import sys

from absl import app, flags, logging

from dreamfusion_jax import cli, errors, export

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_FORMAT = flags.DEFINE_string("format", None, f"Mesh format, one of {', '.join(export.MESH_FORMATS)} (default: "
                              "--out's extension, else glb).")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Density grid samples per axis.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Isosurface density (default: ln 2 / render sample step).")
_TEXTURE = flags.DEFINE_boolean("texture", None, "Bake the albedo into a UV texture (xatlas); --notexture: vertex "
                                "colours. Default: a texture for glb and obj, vertex colours for ply.")
_TEXTURE_SIZE = flags.DEFINE_integer("texture_size", export.DEFAULT_TEXTURE_SIZE, "Texture width and height in texels.")
_MIN_COMPONENT_FRACTION = flags.DEFINE_float(
    "min_component_fraction", export.DEFAULT_MIN_COMPONENT_FRACTION,
    "Drop connected components with fewer faces than this fraction of the largest (0 keeps all).")
_TARGET_FACES = flags.DEFINE_integer("target_faces", 0, "Decimate to at most this many faces (quadric edge "
                                     "collapse, fast-simplification); 0 keeps every face.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 262144, "Grid points per field evaluation.")
_OUT = flags.DEFINE_string("out", None, "Output path (default: <workdir>/export/mesh_<step>.<format>).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
  try:
    mesh, paths, threshold = export.export_run_mesh(
        _WORKDIR.value, step=_STEP.value, out=_OUT.value, format=_FORMAT.value, resolution=_RESOLUTION.value,
        threshold=_THRESHOLD.value, texture=_TEXTURE.value, texture_size=_TEXTURE_SIZE.value,
        min_component_fraction=_MIN_COMPONENT_FRACTION.value, target_faces=_TARGET_FACES.value,
        chunk_size=_CHUNK_SIZE.value, progress=True)
  except errors.InputError as e:
    # The message names the bad value and what would be right; a traceback would not help.
    sys.exit(f"error: {e}")
  print(f"threshold {threshold:g}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, "
        f"watertight={mesh.is_watertight}")
  for path in paths:
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
