"""Mesh export of an optimised scene: isosurface, cleaning, decimation, colour, files.

The density is sampled on a regular grid over the cube [-bound, bound]^3 (zero outside
the bounding sphere, as in rendering), PyMCubes extracts the isosurface at a density
threshold, trimesh drops floaters, fast-simplification (through trimesh) decimates to a
target face count, and the mesh is coloured by the field's albedo at its vertices or,
with a texture, at the texels of an xatlas UV atlas (`texture.py`). Files are GLB, OBJ
or PLY; GLB and OBJ are turned from our +z-up world into their +Y-up convention on the
way out (`WORLD_TO_Y_UP`), PLY keeps world coordinates. Turntable videos live in
`video.py`.

The mesh functions take a plain `field_fn(positions (..., 3)) -> (density (...,),
albedo (..., 3))`, the signature `render.py` uses, so tests export analytic fields
through the same code. A field given as a `jax.tree_util.Partial` (see
`scene_field_fn`) passes its arrays to the compiled evaluator as arguments rather than
baking them into it as constants, which matters for a hash table of many megabytes.
Every file is written atomically (`files.py`), so a failed export never replaces a good
file. (A little over 500 lines: the run-level entry points and their input checks sit
beside the pipeline they guard.)
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import trimesh

from dreamfusion_jax import errors, files, images, runs
from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax import texture as texture_lib

Array = jax.Array
FieldFn = Callable[[Array], tuple[Array, Array]]

MESH_FORMATS = ("glb", "obj", "ply")
# Formats that carry a UV texture; a texture is baked for these unless asked not to.
TEXTURE_FORMATS = ("glb", "obj")
# The files' up axis: glTF 2.0 is +Y up (and OBJ by the common convention of Blender
# and three.js); PLY has no convention and keeps our world's +z.
UP_AXIS = {"glb": "+Y", "obj": "+Y", "ply": "+Z"}
# Our world (cameras.py): right-handed, +z up, the object's front facing +x (a camera at
# azimuth 0 sits on +x). glTF: right-handed, +Y up, the front facing +Z. So world x -> Z,
# z -> Y, and y -> X (X = Y x Z = z x x = y): the cyclic permutation (x, y, z) ->
# (y, z, x), a rotation (determinant +1), so faces keep their outward winding, and the
# view from azimuth 0 is a glTF viewer's default front view (camera on +Z, right = +X =
# our +y, as for our azimuth-0 camera).
WORLD_TO_Y_UP = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
# Connected components with fewer faces than this fraction of the largest one are
# dropped as floaters. The fog blobs SDS leaves around an object are a few voxels
# across (well under 1% of the object's faces at resolution 256), while a legitimate
# detached part (a handle, a second object in the prompt) is rarely below 5%.
DEFAULT_MIN_COMPONENT_FRACTION = 0.05
DEFAULT_TEXTURE_SIZE = 1024


class ExportError(errors.InputError):
  """A bad export input (path, workdir, format, setting) or an empty field; the message
  names the bad value and says what would be right."""


# ---------------------------------------------------------------------------------
# Field evaluation on grids and point sets.


def scene_field_fn(scene: scene_lib.Scene, params: dict, level_mask: Optional[Array] = None) -> FieldFn:
  """The scene's field as a `Partial` whose parameters are compiled as arguments."""
  return jax.tree_util.Partial(functools.partial(_apply_scene_field, scene), params, level_mask)


def _apply_scene_field(scene, params, level_mask, positions):
  return scene.field_fn(params, level_mask)(positions)


def _as_partial(field_fn: FieldFn) -> jax.tree_util.Partial:
  # A plain closure becomes static (its constants are compiled in: fine for analytic
  # fields); a Partial keeps its arrays as arguments of the compiled function.
  return field_fn if isinstance(field_fn, jax.tree_util.Partial) else jax.tree_util.Partial(field_fn)


def grid_positions(resolution: int, bound: float) -> np.ndarray:
  """The 1D sample coordinates of the grid: `resolution` points from -bound to bound."""
  return np.linspace(-bound, bound, resolution, dtype=np.float32)


@functools.partial(jax.jit, static_argnames=("resolution", "bound", "chunk_size"))
def _density_chunk(fn, start, *, resolution: int, bound: float, chunk_size: int):
  """Density at grid points start .. start + chunk_size - 1 (flat index, C order)."""
  idx = jnp.minimum(start + jnp.arange(chunk_size), resolution**3 - 1)
  ijk = jnp.stack([idx // resolution**2, (idx // resolution) % resolution, idx % resolution], axis=-1)
  positions = -bound + ijk.astype(jnp.float32) * (2.0 * bound / (resolution - 1))
  density, _ = fn(positions)
  # The renderer takes density outside the bounding sphere as zero; so does the mesh,
  # which keeps whatever the field does in the cube's corners out of the export.
  return jnp.where(jnp.sum(positions**2, axis=-1) <= bound**2, density, 0.0)


def density_grid(field_fn: FieldFn, *, resolution: int, bound: float, chunk_size: int = 262144,
                 progress: bool = False) -> np.ndarray:
  """Density sampled on a regular grid over [-bound, bound]^3, zero outside the sphere.

  Args:
    field_fn: positions (..., 3) -> (density (...,), albedo (..., 3)).
    resolution: R samples per axis (spacing 2 bound / (R - 1)).
    bound: half-size of the cube, radius of the sphere.
    chunk_size: points per call of the (once-compiled) evaluator; bounds memory.

  Returns:
    (R, R, R) float32, entry [i, j, k] at (x_i, y_j, z_k) of `grid_positions`.
  """
  if resolution < 2:
    raise ExportError(f"resolution must be >= 2, got {resolution}")
  fn = _as_partial(field_fn)
  total = resolution**3
  chunk_size = min(chunk_size, total)
  starts = range(0, total, chunk_size)
  if progress:
    from tqdm import tqdm
    starts = tqdm(starts, desc="density grid", unit="chunk")
  chunks = [np.asarray(_density_chunk(fn, jnp.int32(s), resolution=resolution, bound=float(bound),
                                      chunk_size=chunk_size)) for s in starts]
  return np.concatenate(chunks)[:total].reshape(resolution, resolution, resolution)


@jax.jit
def _field_chunk(fn, positions):
  return fn(positions)


def evaluate_field(field_fn: FieldFn, points: np.ndarray, *, chunk_size: int = 65536) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
  """The field at arbitrary points, in fixed-size chunks (one compile).

  Args:
    points: (N, 3) world positions.

  Returns:
    density (N,) and albedo (N, 3), float32 numpy arrays.
  """
  points = np.asarray(points, np.float32).reshape(-1, 3)
  n = points.shape[0]
  if n == 0:
    return np.zeros((0,), np.float32), np.zeros((0, 3), np.float32)
  fn = _as_partial(field_fn)
  chunk_size = min(chunk_size, n)
  padded = np.concatenate([points, np.repeat(points[-1:], (-n) % chunk_size, axis=0)])
  outs = [jax.device_get(_field_chunk(fn, padded[s:s + chunk_size])) for s in range(0, padded.shape[0], chunk_size)]
  density = np.concatenate([np.asarray(o[0]) for o in outs])[:n]
  albedo = np.concatenate([np.asarray(o[1]) for o in outs])[:n]
  return density.astype(np.float32), albedo.astype(np.float32)


# ---------------------------------------------------------------------------------
# Isosurface extraction and cleaning.


def default_threshold(*, bound: float, num_samples: int) -> float:
  """The density whose one render-sample interval is half opaque: ln 2 / delta.

  A volume renderer with S samples across the bounding sphere's diameter steps
  delta = 2 bound / S; a region at density sigma over one step has opacity
  1 - exp(-sigma delta), which is 1/2 at sigma = ln 2 / delta. Anything denser than
  that over a step renders as mostly solid, anything thinner as see-through fog, so the
  surface at this threshold is the one the optimisation was looking at. It does not
  depend on the export grid's resolution (the surface stays put when --resolution
  changes), and for the default config (bound 1, 64 samples) it is 22.2, close to
  threestudio's fixed 25.
  """
  return math.log(2.0) * num_samples / (2.0 * bound)


def marching_cubes(grid: np.ndarray, *, bound: float, threshold: float) -> trimesh.Trimesh:
  """The isosurface {density = threshold} of a `density_grid`, in world units.

  The grid is padded with a layer of zero density so that a surface reaching the cube's
  faces is closed there. Faces are oriented outwards (towards lower density).

  Raises:
    ValueError: nothing in the grid exceeds `threshold`.
  """
  import mcubes  # PyMCubes

  max_density = float(np.max(grid)) if grid.size else 0.0
  if not max_density > threshold:
    raise ExportError(f"no density above the threshold {threshold:g} (the maximum density found is "
                     f"{max_density:g}): pass a lower --threshold, e.g. {max_density / 2:.3g}, or check "
                     f"that the run trained past the empty start")
  resolution = grid.shape[0]
  padded = np.pad(np.asarray(grid, np.float64), 1, mode="constant", constant_values=0.0)
  vertices, faces = mcubes.marching_cubes(padded, float(threshold))
  voxel = 2.0 * bound / (resolution - 1)
  vertices = -bound + (vertices - 1.0) * voxel
  # PyMCubes orients faces towards values below the isovalue, i.e. outwards for a
  # density, so no flip is needed (tests check the signed volume is positive).
  return trimesh.Trimesh(vertices=vertices, faces=faces.astype(np.int64), process=True, validate=False)


def remove_floaters(mesh: trimesh.Trimesh, min_component_fraction: float) -> trimesh.Trimesh:
  """Drops connected components with fewer faces than a fraction of the largest one.

  Args:
    min_component_fraction: in [0, 1]; 0 keeps every component.
  """
  if not 0.0 <= min_component_fraction <= 1.0:
    raise ExportError(f"min_component_fraction must be in [0, 1], got {min_component_fraction}")
  if min_component_fraction == 0.0 or len(mesh.faces) == 0:
    return mesh
  components = mesh.split(only_watertight=False)
  if len(components) <= 1:
    return mesh
  largest = max(len(c.faces) for c in components)
  kept = [c for c in components if len(c.faces) >= min_component_fraction * largest]
  return trimesh.util.concatenate(kept)


def decimate(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
  """Quadric edge-collapse decimation to at most `target_faces` faces.

  trimesh's `simplify_quadric_decimation`, which runs the `fast-simplification`
  package (Garland-Heckbert quadric error metrics, Sp4cerat's Fast-Quadric-Mesh-
  Simplification). The result has geometry only: colour it afterwards.

  Args:
    target_faces: the face budget; 0 (or a budget the mesh already meets) returns the
      mesh unchanged.
  """
  if target_faces < 0:
    raise ExportError(f"target_faces must be >= 0 (0 keeps every face), got {target_faces}")
  if target_faces == 0 or len(mesh.faces) <= target_faces:
    return mesh
  return mesh.simplify_quadric_decimation(face_count=int(target_faces))


def colour_vertices(mesh: trimesh.Trimesh, field_fn: FieldFn, *, chunk_size: int = 65536) -> trimesh.Trimesh:
  """A copy of `mesh` with vertex colours (RGBA uint8) from the field's albedo."""
  _, albedo = evaluate_field(field_fn, mesh.vertices, chunk_size=chunk_size)
  coloured = mesh.copy()
  coloured.visual = trimesh.visual.ColorVisuals(coloured, vertex_colors=_rgba(albedo))
  return coloured


def _rgba(albedo: np.ndarray) -> np.ndarray:
  rgb = images.to_uint8(albedo[None])[0]
  return np.concatenate([rgb, np.full(rgb.shape[:1] + (1,), 255, np.uint8)], axis=-1)


def extract_mesh(
    field_fn: FieldFn,
    *,
    resolution: int,
    bound: float,
    threshold: float,
    min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    target_faces: int = 0,
    colour: bool = True,
    chunk_size: int = 262144,
    progress: bool = False,
) -> trimesh.Trimesh:
  """Density grid -> marching cubes -> floaters removed -> decimated -> vertex colours.

  Args:
    field_fn: positions (..., 3) -> (density (...,), albedo (..., 3)).
    resolution: grid samples per axis. bound: half-size of the sampled cube.
    threshold: isosurface density (see `default_threshold`).
    min_component_fraction: see `remove_floaters`.
    target_faces: see `decimate` (0: no decimation).
    colour: add vertex colours from the albedo.

  Returns:
    the mesh in world units (+z up).

  Raises:
    ExportError: no density above the threshold.
  """
  grid = density_grid(field_fn, resolution=resolution, bound=bound, chunk_size=chunk_size, progress=progress)
  mesh = remove_floaters(marching_cubes(grid, bound=bound, threshold=threshold), min_component_fraction)
  mesh = decimate(mesh, target_faces)
  return colour_vertices(mesh, field_fn) if colour else mesh


def bake_texture(mesh: trimesh.Trimesh, field_fn: FieldFn, *, texture_size: int = DEFAULT_TEXTURE_SIZE,
                 chunk_size: int = 65536) -> trimesh.Trimesh:
  """A UV-textured copy of `mesh` holding the field's albedo (see `texture.bake_texture`)."""
  return texture_lib.bake_texture(mesh, lambda points: evaluate_field(field_fn, points, chunk_size=chunk_size)[1],
                                  texture_size=texture_size)


# ---------------------------------------------------------------------------------
# Files.


def to_y_up(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
  """A copy of a world-frame (+z up, front +x) mesh in the +Y-up, front +Z frame of glTF
  and OBJ: positions p -> WORLD_TO_Y_UP p, a rotation, so winding and handedness stay."""
  transform = np.eye(4)
  transform[:3, :3] = WORLD_TO_Y_UP
  converted = mesh.copy()
  converted.apply_transform(transform)
  return converted


def save_mesh(mesh: trimesh.Trimesh, path: str, format: Optional[str] = None) -> list[str]:  # pylint: disable=redefined-builtin
  """Writes a world-frame mesh as GLB, OBJ (with MTL + PNG when textured) or PLY, atomically.

  GLB and OBJ are written +Y up (`to_y_up`), PLY in world coordinates (`UP_AXIS`).

  Args:
    format: "glb", "obj" or "ply"; default from the file extension.

  Returns:
    the paths written (the mesh file last: it appears only once its texture is there).
  """
  format = mesh_format(path, format)
  textured = isinstance(mesh.visual, trimesh.visual.TextureVisuals)
  if format == "ply" and textured:
    raise ExportError("PLY has no textures: use --format=obj or glb for a texture, or --notexture")
  if UP_AXIS[format] == "+Y":
    mesh = to_y_up(mesh)
  if format == "obj":
    stem = os.path.splitext(os.path.basename(path))[0]
    if textured:
      # Name the MTL's material and texture after the file, so that two exports in one
      # directory do not overwrite each other's texture; Kd = Ka = 1 so that viewers
      # that multiply map_Kd by Kd show the albedo itself.
      image = getattr(mesh.visual.material, "baseColorTexture", None) or mesh.visual.material.image
      mesh.visual.material = trimesh.visual.material.SimpleMaterial(
          image=image, name=stem, diffuse=[255, 255, 255, 255], ambient=[255, 255, 255, 255],
          specular=[0, 0, 0, 255])
    text, side_files = trimesh.exchange.obj.export_obj(mesh, include_texture=True, return_texture=True,
                                                       write_texture=False, mtl_name=f"{stem}.mtl")
    written = []
    for name, data in side_files.items():
      side_path = os.path.join(os.path.dirname(os.path.abspath(path)), name)
      files.write_bytes(side_path, data)
      written.append(side_path)
    files.write_bytes(path, text.encode("utf-8"))
    return written + [path]
  if format == "glb":
    data = trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh), tree_postprocessor=_matte_default_material)
  else:
    data = mesh.export(file_type=format)
  files.write_bytes(path, data)
  return [path]


def _matte_default_material(tree: dict) -> None:
  """Gives glTF primitives without a material (vertex-coloured meshes) a matte white one:
  glTF's default material is fully metallic, which viewers show dark."""
  primitives = [p for m in tree.get("meshes", []) for p in m.get("primitives", []) if "material" not in p]
  if not primitives:
    return
  materials = tree.setdefault("materials", [])
  materials.append({"name": "vertex_colour", "pbrMetallicRoughness": {
      "baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}})
  for primitive in primitives:
    primitive["material"] = len(materials) - 1


# ---------------------------------------------------------------------------------
# Checks at the boundary: every bad input fails here, before any work and before
# anything is written.


def mesh_format(path: str, format: Optional[str] = None) -> str:  # pylint: disable=redefined-builtin
  """The mesh format to write: `format` if given (and consistent with the extension)."""
  ext = os.path.splitext(path)[1].lower().lstrip(".")
  if format not in (None,) + MESH_FORMATS:
    raise ExportError(f"mesh format must be one of {', '.join(MESH_FORMATS)}, got {format!r}")
  if format is None and ext not in MESH_FORMATS:
    raise ExportError(f"mesh format must be one of {', '.join(MESH_FORMATS)}, got {ext!r} (the extension of {path!r})")
  format = format or ext
  if ext and ext != format:
    raise ExportError(f"output path {path!r} does not end in .{format}")
  return format


def check_export_args(
    path: str,
    *,
    format: Optional[str] = None,  # pylint: disable=redefined-builtin
    texture: Optional[bool] = None,
    resolution: int = 256,
    min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    target_faces: int = 0,
    texture_size: int = DEFAULT_TEXTURE_SIZE,
) -> tuple[str, bool]:
  """Validates export settings before anything is computed.

  Args:
    texture: bake a UV texture; None: yes for the formats that carry one
      (`TEXTURE_FORMATS`), vertex colours otherwise.

  Returns:
    (format, texture).
  """
  format = mesh_format(path, format)
  if texture is None:
    texture = format in TEXTURE_FORMATS
  if texture and format not in TEXTURE_FORMATS:
    raise ExportError(f"{format.upper()} has no textures: use --format=obj or glb for a texture, or --notexture")
  if resolution < 2:
    raise ExportError(f"resolution must be >= 2, got {resolution}")
  if not 0.0 <= min_component_fraction <= 1.0:
    raise ExportError(f"min_component_fraction must be in [0, 1], got {min_component_fraction}")
  if target_faces < 0:
    raise ExportError(f"target_faces must be >= 0 (0 keeps every face), got {target_faces}")
  if texture and texture_size < 8:
    raise ExportError(f"texture_size must be >= 8, got {texture_size}")
  return format, texture


def check_writable(path: str) -> None:
  """Raises unless `path` can be written: its nearest existing ancestor directory must
  accept a new file. Probed with an unnamed temporary file (O_TMPFILE where the file
  system has it), so nothing appears in the directory."""
  ancestor = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise ExportError(f"cannot write {path!r}: {ancestor!r} is a file, not a directory")
  if os.path.isdir(path):
    raise ExportError(f"cannot write {path!r}: it is a directory")
  try:
    with tempfile.TemporaryFile(dir=ancestor):
      pass
  except OSError as e:
    raise ExportError(f"cannot write {path!r}: directory {ancestor!r} is not writable ({e.strerror})") from e


# ---------------------------------------------------------------------------------
# Entry points: a field, a scene, a run.


def export_mesh(
    field_fn: FieldFn,
    path: str,
    *,
    resolution: int,
    bound: float,
    threshold: float,
    format: Optional[str] = None,  # pylint: disable=redefined-builtin
    texture: Optional[bool] = None,
    texture_size: int = DEFAULT_TEXTURE_SIZE,
    min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    target_faces: int = 0,
    chunk_size: int = 262144,
    progress: bool = False,
) -> tuple[trimesh.Trimesh, list[str]]:
  """Extracts, decimates, colours (baked texture or vertex colours) and writes a field's mesh.

  Everything is validated before any work, and nothing is written unless extraction
  succeeds (see `extract_mesh` and `check_export_args` for the arguments).

  Returns:
    the mesh (world frame) and the paths written.
  """
  format, texture = check_export_args(path, format=format, texture=texture, resolution=resolution,
                                      min_component_fraction=min_component_fraction, target_faces=target_faces,
                                      texture_size=texture_size)
  check_writable(path)
  mesh = extract_mesh(field_fn, resolution=resolution, bound=bound, threshold=threshold,
                      min_component_fraction=min_component_fraction, target_faces=target_faces,
                      colour=not texture, chunk_size=chunk_size, progress=progress)
  if texture:
    mesh = bake_texture(mesh, field_fn, texture_size=texture_size)
  return mesh, save_mesh(mesh, path, format)


def export_scene_mesh(config: ml_collections.ConfigDict, scene: scene_lib.Scene, params: dict, out: str, *,
                      step: Optional[int] = None, resolution: int = 128, threshold: Optional[float] = None,
                      **kwargs) -> tuple[trimesh.Trimesh, list[str], float]:
  """Exports a scene's mesh, written atomically to `out`.

  Args:
    step: the training step, for the scene's coarse-to-fine level mask; None: all levels.
    threshold: isosurface density; default the scene's `mesh_threshold` if it has one,
      else `default_threshold` of the config.
    **kwargs: format, texture, texture_size, min_component_fraction, target_faces,
      chunk_size, progress (see `export_mesh`).

  Returns:
    (mesh, paths written, threshold used).

  Raises:
    ExportError: bad arguments, or nothing above the threshold (nothing is written).
  """
  bound = float(config.render.bound)
  if threshold is None:
    # A representation with its own density scale names its threshold (Gaussians:
    # DreamGaussian's 1 on the summed Gaussians); a NeRF's follows its ray sampling.
    threshold = getattr(scene, "mesh_threshold", None)
  if threshold is None:
    threshold = default_threshold(bound=bound, num_samples=int(config.render.num_samples))
  field_fn = scene_field_fn(scene, params, None if step is None else scene.level_mask(step))
  mesh, paths = export_mesh(field_fn, out, resolution=resolution, bound=bound, threshold=threshold, **kwargs)
  return mesh, paths, threshold


def export_run_mesh(
    workdir: str,
    *,
    step: Optional[int] = None,
    out: Optional[str] = None,
    format: Optional[str] = None,  # pylint: disable=redefined-builtin
    resolution: int = 256,
    texture: Optional[bool] = None,
    min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    target_faces: int = 0,
    texture_size: int = DEFAULT_TEXTURE_SIZE,
    **kwargs,
) -> tuple[trimesh.Trimesh, list[str], float]:
  """Exports the mesh of a training run's checkpoint (the latest unless `step`).

  Args:
    out: output path; default `workdir/export/mesh_<step>.<format>`.
    format: "glb" (default), "obj" or "ply"; with `out`, taken from its extension.
    texture, texture_size, min_component_fraction, target_faces: see `export_mesh`.
    **kwargs: threshold, chunk_size, progress (see `export_scene_mesh`).

  Returns:
    (mesh, paths written, threshold used).

  Raises:
    ExportError: a bad argument, workdir or output path (found before the slow
      restore), or nothing above the threshold; the workdir is left as it was.
  """
  format, texture = check_export_args(out if out is not None else f"mesh.{format or 'glb'}", format=format,
                                      texture=texture, resolution=resolution,
                                      min_component_fraction=min_component_fraction, target_faces=target_faces,
                                      texture_size=texture_size)
  runs.check_run_dir(workdir, step)
  check_writable(out if out is not None else os.path.join(workdir, "export", f"mesh.{format}"))
  config, scene, params, restored_step = runs.restore_scene(workdir, step)
  if out is None:
    out = os.path.join(workdir, "export", f"mesh_{restored_step:06d}.{format}")
  return export_scene_mesh(config, scene, params, out, step=restored_step, resolution=resolution,
                           format=format, texture=texture, min_component_fraction=min_component_fraction,
                           target_faces=target_faces, texture_size=texture_size, **kwargs)
