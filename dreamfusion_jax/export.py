"""Export of an optimised scene: isosurface meshes and turntable videos.

Mesh: the density is sampled on a regular grid over the cube [-bound, bound]^3 (zero
outside the bounding sphere, as in rendering), PyMCubes extracts the isosurface at a
density threshold, trimesh drops floaters and writes GLB / OBJ / PLY, coloured by the
field's albedo at the vertices or, with a texture, at the texels of an xatlas UV atlas.
Video: orbit cameras around the object rendered in fixed-size batches by one jitted
function, written as MP4 and GIF (and PNG frames on request).

The mesh functions take a plain `field_fn(positions (..., 3)) -> (density (...,),
albedo (..., 3))`, the signature `render.py` uses, so tests export analytic fields
through the same code. A field given as a `jax.tree_util.Partial` (see
`scene_field_fn`) passes its arrays to the compiled evaluator as arguments rather than
baking them into it as constants, which matters for a hash table of many megabytes.
Every file is written to a temporary name in its directory and moved into place with
`os.replace`, so a failed export never replaces a good file.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import trimesh

from dreamfusion_jax import cameras as cameras_lib
from dreamfusion_jax import files
from dreamfusion_jax import images, runs, visualize
from dreamfusion_jax import scene as scene_lib

Array = jax.Array
FieldFn = Callable[[Array], tuple[Array, Array]]

MESH_FORMATS = ("glb", "obj", "ply")
VIDEO_LAYERS = ("rgb", "normals", "depth", "opacity")
# Connected components with fewer faces than this fraction of the largest one are
# dropped as floaters. The fog blobs SDS leaves around an object are a few voxels
# across (well under 1% of the object's faces at resolution 256), while a legitimate
# detached part (a handle, a second object in the prompt) is rarely below 5%.
DEFAULT_MIN_COMPONENT_FRACTION = 0.05


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
    raise ValueError(f"resolution must be >= 2, got {resolution}")
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
    raise ValueError(f"no density above the threshold {threshold:g} (the maximum density found is "
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
    raise ValueError(f"min_component_fraction must be in [0, 1], got {min_component_fraction}")
  if min_component_fraction == 0.0 or len(mesh.faces) == 0:
    return mesh
  components = mesh.split(only_watertight=False)
  if len(components) <= 1:
    return mesh
  largest = max(len(c.faces) for c in components)
  kept = [c for c in components if len(c.faces) >= min_component_fraction * largest]
  return trimesh.util.concatenate(kept)


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
    colour: bool = True,
    chunk_size: int = 262144,
    progress: bool = False,
) -> trimesh.Trimesh:
  """Density grid -> marching cubes -> floaters removed -> vertex colours.

  Args:
    field_fn: positions (..., 3) -> (density (...,), albedo (..., 3)).
    resolution: grid samples per axis. bound: half-size of the sampled cube.
    threshold: isosurface density (see `default_threshold`).
    min_component_fraction: see `remove_floaters`.
    colour: add vertex colours from the albedo.

  Returns:
    the mesh in world units.

  Raises:
    ValueError: no density above the threshold.
  """
  grid = density_grid(field_fn, resolution=resolution, bound=bound, chunk_size=chunk_size, progress=progress)
  mesh = remove_floaters(marching_cubes(grid, bound=bound, threshold=threshold), min_component_fraction)
  return colour_vertices(mesh, field_fn) if colour else mesh


# ---------------------------------------------------------------------------------
# UV texture baking.


def uv_atlas(mesh: trimesh.Trimesh, *, texture_size: int, padding: int = 2) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
  """xatlas UV parametrisation of a mesh (vertices are split along chart seams).

  Returns:
    vertex_map (V',) index of each new vertex in `mesh.vertices`, faces (F, 3) into
    the new vertices, uv (V', 2) in [0, 1] (OBJ convention: v = 0 at the image bottom).
  """
  import xatlas

  atlas = xatlas.Atlas()
  atlas.add_mesh(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.uint32))
  pack = xatlas.PackOptions()
  pack.resolution = texture_size
  pack.padding = padding
  pack.bilinear = True
  atlas.generate(pack_options=pack)
  vertex_map, faces, uv = atlas[0]
  return vertex_map.astype(np.int64), faces.astype(np.int64), uv.astype(np.float32)


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, texture_size: int) -> tuple[np.ndarray, np.ndarray,
                                                                             np.ndarray]:
  """Which triangle covers each texel centre of a UV atlas, and where.

  Texel (r, c) has its centre at u = (c + 0.5) / T, v = 1 - (r + 0.5) / T (the
  convention of OpenGL samplers with OBJ's upward v). Each triangle's texel bounding
  box is enumerated at once for all triangles (no loop over faces).

  Args:
    uv: (V, 2). faces: (F, 3). texture_size: T.

  Returns:
    texel_rc (K, 2) int rows and columns of covered texels, face (K,) the covering
    triangle, bary (K, 3) barycentric coordinates in that triangle.
  """
  t = texture_size
  pixel = np.stack([uv[:, 0] * t - 0.5, (1.0 - uv[:, 1]) * t - 0.5], axis=-1).astype(np.float64)
  tri = pixel[faces]  # (F, 3, 2) in texel-centre units (x = column, y = row)
  lo = np.clip(np.ceil(tri.min(axis=1) - 1e-6), 0, t - 1).astype(np.int64)
  hi = np.clip(np.floor(tri.max(axis=1) + 1e-6), 0, t - 1).astype(np.int64)
  size = np.maximum(hi - lo + 1, 0)
  counts = size[:, 0] * size[:, 1]
  face = np.repeat(np.arange(len(faces)), counts)
  offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  width = size[face, 0]
  col = lo[face, 0] + offset % width
  row = lo[face, 1] + offset // width
  a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
  p = np.stack([col, row], axis=-1).astype(np.float64)

  def cross(u, v):
    return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]

  area = cross(b - a, c - a)
  safe = np.where(np.abs(area) > 1e-12, area, 1.0)
  w_a = cross(b - p, c - p) / safe
  w_b = cross(c - p, a - p) / safe
  w_c = 1.0 - w_a - w_b
  bary = np.stack([w_a, w_b, w_c], axis=-1)
  inside = (np.abs(area) > 1e-12) & np.all(bary >= -1e-6, axis=-1)
  return np.stack([row, col], axis=-1)[inside], face[inside], bary[inside].astype(np.float32)


def _dilate(texture: np.ndarray, filled: np.ndarray, iterations: int) -> np.ndarray:
  """Grows filled texels into empty neighbours (mean of the filled 4-neighbours), so
  bilinear lookups and mip-maps near chart borders do not pick up the empty colour."""
  texture, filled = texture.copy(), filled.copy()
  for _ in range(iterations):
    acc = np.zeros_like(texture)
    num = np.zeros(filled.shape, np.float32)
    for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
      acc += np.roll(texture * filled[..., None], shift, axis=axis)
      num += np.roll(filled.astype(np.float32), shift, axis=axis)
    grow = ~filled & (num > 0)
    texture[grow] = acc[grow] / num[grow, None]
    filled = filled | grow
  return texture


def bake_texture(mesh: trimesh.Trimesh, field_fn: FieldFn, *, texture_size: int = 1024,
                 chunk_size: int = 65536) -> trimesh.Trimesh:
  """A UV-textured copy of `mesh` whose texture holds the albedo at each texel's surface point.

  Args:
    mesh: the geometry (vertex colours, if any, are dropped).
    field_fn: positions -> (density, albedo).
    texture_size: T, the texture is T x T.

  Returns:
    a mesh with `TextureVisuals` (uv per vertex and a PIL image).
  """
  from PIL import Image

  vertex_map, faces, uv = uv_atlas(mesh, texture_size=texture_size)
  vertices = np.asarray(mesh.vertices)[vertex_map]
  texel_rc, face, bary = rasterize_uv(uv, faces, texture_size)
  # A texel's surface point: the same barycentric combination of the 3D corners.
  points = np.einsum("kj,kjd->kd", bary, vertices[faces[face]])
  _, albedo = evaluate_field(field_fn, points, chunk_size=chunk_size)
  texture = np.zeros((texture_size, texture_size, 3), np.float32)
  filled = np.zeros((texture_size, texture_size), bool)
  texture[texel_rc[:, 0], texel_rc[:, 1]] = albedo
  filled[texel_rc[:, 0], texel_rc[:, 1]] = True
  texture = _dilate(texture, filled, iterations=4)
  # A matte, white-factored material: the texture is the albedo. (glTF's default
  # material is fully metallic, which viewers show dark.)
  material = trimesh.visual.material.PBRMaterial(
      name="albedo", baseColorTexture=Image.fromarray(images.to_uint8(texture)),
      baseColorFactor=[255, 255, 255, 255], metallicFactor=0.0, roughnessFactor=1.0)
  visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
  return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)


# ---------------------------------------------------------------------------------
# Files.


def save_mesh(mesh: trimesh.Trimesh, path: str, format: Optional[str] = None) -> list[str]:  # pylint: disable=redefined-builtin
  """Writes a mesh as GLB, OBJ (with MTL + PNG when textured) or PLY, atomically.

  Args:
    format: "glb", "obj" or "ply"; default from the file extension.

  Returns:
    the paths written (the mesh file last: it appears only once its texture is there).
  """
  format = mesh_format(path, format)
  textured = isinstance(mesh.visual, trimesh.visual.TextureVisuals)
  if format == "ply" and textured:
    raise ValueError("PLY has no textures: use --format=obj or glb with --texture, or drop --texture")
  if format == "obj":
    stem = os.path.splitext(os.path.basename(path))[0]
    if textured:
      # Name the MTL's material and texture after the file, so that two exports in one
      # directory do not overwrite each other's texture; Kd = Ka = 1 so that viewers
      # that multiply map_Kd by Kd show the albedo itself.
      image = getattr(mesh.visual.material, "baseColorTexture", None) or mesh.visual.material.image
      mesh = mesh.copy()
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


def mesh_format(path: str, format: Optional[str] = None) -> str:  # pylint: disable=redefined-builtin
  """The mesh format to write: `format` if given (and consistent with the extension)."""
  ext = os.path.splitext(path)[1].lower().lstrip(".")
  if format is None:
    format = ext
  if format not in MESH_FORMATS:
    raise ValueError(f"mesh format must be one of {MESH_FORMATS}, got {format!r} (from {path!r})")
  if ext and ext != format:
    raise ValueError(f"output path {path!r} does not end in .{format}")
  return format


def check_export_args(path: str, *, format: Optional[str] = None, texture: bool = False,  # pylint: disable=redefined-builtin
                      resolution: int = 256, min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION) -> str:
  """Validates export settings before anything is computed; returns the format."""
  format = mesh_format(path, format)
  if texture and format == "ply":
    raise ValueError("PLY has no textures: use --format=obj or glb with --texture, or drop --texture")
  if resolution < 2:
    raise ValueError(f"resolution must be >= 2, got {resolution}")
  if not 0.0 <= min_component_fraction <= 1.0:
    raise ValueError(f"min_component_fraction must be in [0, 1], got {min_component_fraction}")
  return format


def export_mesh(
    field_fn: FieldFn,
    path: str,
    *,
    resolution: int,
    bound: float,
    threshold: float,
    format: Optional[str] = None,  # pylint: disable=redefined-builtin
    texture: bool = False,
    texture_size: int = 1024,
    min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    chunk_size: int = 262144,
    progress: bool = False,
) -> tuple[trimesh.Trimesh, list[str]]:
  """Extracts, colours (vertex colours or baked texture) and writes a field's mesh.

  Everything is validated before any work, and nothing is written unless extraction
  succeeds (see `extract_mesh` for the arguments).

  Returns:
    the mesh and the paths written.
  """
  format = check_export_args(path, format=format, texture=texture, resolution=resolution,
                             min_component_fraction=min_component_fraction)
  mesh = extract_mesh(field_fn, resolution=resolution, bound=bound, threshold=threshold,
                      min_component_fraction=min_component_fraction, colour=not texture,
                      chunk_size=chunk_size, progress=progress)
  if texture:
    mesh = bake_texture(mesh, field_fn, texture_size=texture_size)
  return mesh, save_mesh(mesh, path, format)


def export_scene_mesh(config: ml_collections.ConfigDict, scene: scene_lib.Scene, params: dict, out: str, *,
                      step: Optional[int] = None, resolution: int = 128, threshold: Optional[float] = None,
                      **kwargs) -> tuple[trimesh.Trimesh, list[str], float]:
  """Exports a scene's mesh, written atomically to `out`.

  Args:
    step: the training step, for the scene's coarse-to-fine level mask; None: all levels.
    threshold: isosurface density; default `default_threshold` of the config.
    **kwargs: format, texture, texture_size, min_component_fraction, chunk_size, progress
      (see `export_mesh`).

  Returns:
    (mesh, paths written, threshold used).

  Raises:
    ValueError: bad arguments, or nothing above the threshold (nothing is written).
  """
  bound = float(config.render.bound)
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
    texture: bool = False,
    min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    **kwargs,
) -> tuple[trimesh.Trimesh, list[str], float]:
  """Exports the mesh of a training run's checkpoint (the latest unless `step`).

  Args:
    out: output path; default `workdir/export/mesh_<step>.<format>`.
    format: "glb" (default), "obj" or "ply"; with `out`, taken from its extension.
    texture, min_component_fraction: see `export_mesh`.
    **kwargs: threshold, texture_size, chunk_size, progress (see `export_scene_mesh`).

  Returns:
    (mesh, paths written, threshold used).
  """

  # Validate before the (slow) restore.
  format = check_export_args(out if out is not None else f"mesh.{format or 'glb'}", format=format,
                             texture=texture, resolution=resolution,
                             min_component_fraction=min_component_fraction)
  config, scene, params, restored_step = runs.restore_scene(workdir, step)
  if out is None:
    out = os.path.join(workdir, "export", f"mesh_{restored_step:06d}.{format}")
  return export_scene_mesh(config, scene, params, out, step=restored_step, resolution=resolution,
                           format=format, texture=texture, min_component_fraction=min_component_fraction,
                           **kwargs)


# ---------------------------------------------------------------------------------
# Turntable video.


def turntable_frames(renders: dict, layers: Sequence[str] = VIDEO_LAYERS) -> np.ndarray:
  """Side-by-side panels of the chosen layers for every frame.

  Args:
    renders: `scene.render_eval_views` output for all N frames (numpy). Depth is
      greyed with one range over the whole video, so brightness does not flicker.
    layers: subset of VIDEO_LAYERS, left to right.

  Returns:
    uint8 (N, H, len(layers) * W, 3).
  """
  _check_layers(layers)
  panels = {
      "rgb": lambda: renders["rgb"],
      "normals": lambda: renders["normals"],
      "depth": lambda: images.depth_to_gray(renders["depth"], renders["opacity"]),
      "opacity": lambda: renders["opacity"],
  }
  return np.concatenate([images.to_uint8_batch(panels[name]()) for name in layers], axis=2)


def _check_layers(layers: Sequence[str]) -> None:
  if not layers or any(name not in VIDEO_LAYERS for name in layers):
    raise ValueError(f"video layers must be a non-empty subset of {VIDEO_LAYERS}, got {tuple(layers)}")


def _even(frames: np.ndarray) -> np.ndarray:
  # H.264 in yuv420p needs even sizes; repeat the last row / column if odd.
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else frames


def write_mp4(path: str, frames: np.ndarray, *, fps: int) -> None:
  """uint8 (N, H, W, 3) frames as an H.264 MP4, atomically."""
  import imageio.v2 as imageio

  def write(tmp):
    # macro_block_size=1: keep the exact frame size (imageio would otherwise resize to
    # multiples of 16).
    with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                            pixelformat="yuv420p", macro_block_size=1) as writer:
      for frame in _even(frames):
        writer.append_data(frame)

  files.write_atomically(path, write)


def write_gif(path: str, frames: np.ndarray, *, fps: int) -> None:
  """uint8 (N, H, W, 3) frames as a looping GIF, atomically."""
  import imageio.v3 as iio

  files.write_atomically(path, lambda tmp: iio.imwrite(tmp, frames, extension=".gif", duration=1000.0 / fps, loop=0))


def render_turntable(
    config: ml_collections.ConfigDict,
    scene: scene_lib.Scene,
    params: dict,
    out_dir: str,
    *,
    step: Optional[int] = None,
    num_frames: int = 120,
    elevation_deg: Optional[float] = None,
    radius: Optional[float] = None,
    fovy_deg: Optional[float] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    layers: Sequence[str] = VIDEO_LAYERS,
    batch_size: int = 8,
    fps: int = 30,
    save_frames: bool = False,
    name: str = "turntable",
    progress: bool = True,
) -> dict:
  """Renders `num_frames` views on a circle around the object and writes the video.

  Cameras: `cameras.orbit_cameras` at a fixed elevation, radius and field of view
  (default config.cameras.eval_*), frame i at azimuth 360 i / num_frames. Frames are
  rendered `batch_size` at a time by one jitted `scene.render_eval_views` (the last
  batch is padded, so there is one compile), then the chosen layers are laid side by
  side (see `turntable_frames`).

  Args:
    config, scene, params: the run (as from `train.restore_scene`, or the loop's state).
    out_dir: where `<name>.mp4`, `<name>.gif` and, with `save_frames`,
      `<name>_frames/0000.png ...` go.
    step: training step, for the hash grid's progressive level mask (None: all levels).
    height, width: frame size of each layer (default config.train.eval_height/width).

  Returns:
    dict with "mp4", "gif" and (with save_frames) "frames" (list of PNG paths).
  """
  c = config.cameras
  elevation_deg = c.eval_elevation_deg if elevation_deg is None else elevation_deg
  radius = c.eval_radius if radius is None else radius
  fovy_deg = c.eval_fovy_deg if fovy_deg is None else fovy_deg
  height = config.train.eval_height if height is None else height
  width = config.train.eval_width if width is None else width
  if num_frames < 1 or height < 1 or width < 1 or batch_size < 1:
    raise ValueError(f"num_frames, height, width and batch_size must be >= 1; got {num_frames}, {height}, "
                     f"{width}, {batch_size}")
  if radius <= config.render.bound:
    raise ValueError(f"video radius {radius} must be outside the bounding sphere (bound {config.render.bound})")
  _check_layers(layers)

  cams = cameras_lib.orbit_cameras(num_frames, elevation_deg=elevation_deg, radius=radius, fovy_deg=fovy_deg)
  batch_size = min(batch_size, num_frames)
  num_batches = -(-num_frames // batch_size)
  # Pad with the last pose so every batch has the same shape (one compile).
  index = np.minimum(np.arange(num_batches * batch_size), num_frames - 1)
  cams = jax.tree_util.tree_map(lambda x: x[index], cams)
  render_fn = visualize.make_eval_renderer(scene, height=height, width=width, chunk_size=config.render.eval_chunk)
  level_mask = None if step is None else scene.level_mask(step)
  batches = range(num_batches)
  if progress:
    from tqdm import tqdm
    batches = tqdm(batches, desc="turntable", unit="batch")
  parts = []
  for b in batches:
    batch_cams = jax.tree_util.tree_map(lambda x: x[b * batch_size:(b + 1) * batch_size], cams)
    parts.append(jax.device_get(render_fn(params, batch_cams, level_mask=level_mask)))
  renders = {k: np.concatenate([p[k] for p in parts])[:num_frames] for k in parts[0]}
  frames = turntable_frames(renders, layers)

  paths = {"mp4": os.path.join(out_dir, f"{name}.mp4"), "gif": os.path.join(out_dir, f"{name}.gif")}
  write_mp4(paths["mp4"], frames, fps=fps)
  write_gif(paths["gif"], frames, fps=fps)
  if save_frames:
    paths["frames"] = [os.path.join(out_dir, f"{name}_frames", f"{i:04d}.png") for i in range(num_frames)]
    for path, frame in zip(paths["frames"], frames):
      images.save_png(path, frame)
  return paths


def render_run_turntable(workdir: str, *, step: Optional[int] = None, out_dir: Optional[str] = None,
                         **kwargs) -> dict:
  """`render_turntable` of a run's checkpoint (the latest unless `step`); by default
  into `workdir/videos/step_<step>/`. Returns its paths plus "step"."""

  config, scene, params, restored_step = runs.restore_scene(workdir, step)
  if out_dir is None:
    out_dir = os.path.join(workdir, "videos", f"step_{restored_step:06d}")
  paths = render_turntable(config, scene, params, out_dir, step=restored_step, **kwargs)
  return dict(paths, step=restored_step)
