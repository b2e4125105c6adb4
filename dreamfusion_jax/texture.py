"""UV textures for meshes: an xatlas atlas, and the albedo baked into its texels.

`bake_texture` parametrises a mesh with xatlas (vertices are split along chart seams),
finds for every texel centre the triangle that covers it in UV space, maps it to its 3D
point with the same barycentric weights, asks `albedo_fn` for the colour there and
writes it into the texel; filled texels are then grown into the empty space around the
charts. The result is a trimesh mesh with a matte PBR material that glTF and OBJ
writers understand. Callers pass the albedo as a plain function of points, so this
module knows nothing of fields or scenes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import trimesh

from dreamfusion_jax import images

AlbedoFn = Callable[[np.ndarray], np.ndarray]


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


def bake_texture(mesh: trimesh.Trimesh, albedo_fn: AlbedoFn, *, texture_size: int) -> trimesh.Trimesh:
  """A UV-textured copy of `mesh` whose texture holds the albedo at each texel's surface point.

  Args:
    mesh: the geometry (vertex colours, if any, are dropped).
    albedo_fn: (K, 3) surface points -> (K, 3) albedo in [0, 1] (numpy).
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
  albedo = np.asarray(albedo_fn(points), np.float32)
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
