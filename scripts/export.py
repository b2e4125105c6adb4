"""Exports a training run's field as a mesh (marching cubes on the density).

  python scripts/export.py --workdir=runs/hamburger                       # GLB, vertex colours
  python scripts/export.py --workdir=runs/hamburger --format=obj --texture  # OBJ + MTL + PNG
  python scripts/export.py --workdir=runs/hamburger --step=5000 --threshold=10 --out=burger.ply

The default threshold is the density at which one render-sample step is half opaque,
ln 2 * num_samples / (2 * bound) (22.2 for the default config); see docs/export.md.
"""

from absl import app, flags

from dreamfusion_jax import export

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_FORMAT = flags.DEFINE_enum("format", None, list(export.MESH_FORMATS), "Mesh format (default: --out's "
                            "extension, else glb).")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Density grid samples per axis.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Isosurface density (default: ln 2 / render sample step).")
_TEXTURE = flags.DEFINE_boolean("texture", False, "Bake the albedo into a UV texture (xatlas) instead of "
                                "vertex colours (glb or obj).")
_TEXTURE_SIZE = flags.DEFINE_integer("texture_size", 1024, "Texture width and height in texels.")
_MIN_COMPONENT_FRACTION = flags.DEFINE_float(
    "min_component_fraction", export.DEFAULT_MIN_COMPONENT_FRACTION,
    "Drop connected components with fewer faces than this fraction of the largest (0 keeps all).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 262144, "Grid points per field evaluation.")
_OUT = flags.DEFINE_string("out", None, "Output path (default: <workdir>/export/mesh_<step>.<format>).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mesh, paths, threshold = export.export_run_mesh(
      _WORKDIR.value, step=_STEP.value, out=_OUT.value, format=_FORMAT.value, resolution=_RESOLUTION.value,
      threshold=_THRESHOLD.value, texture=_TEXTURE.value, texture_size=_TEXTURE_SIZE.value,
      min_component_fraction=_MIN_COMPONENT_FRACTION.value, chunk_size=_CHUNK_SIZE.value, progress=True)
  print(f"threshold {threshold:g}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, "
        f"watertight={mesh.is_watertight}")
  for path in paths:
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
