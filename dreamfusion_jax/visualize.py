"""Validation images: fixed views of the scene rendered to labelled PNG grids."""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from dreamfusion_jax import cameras as cameras_lib
from dreamfusion_jax import images, scene as scene_lib
from dreamfusion_jax import state as state_lib


def eval_cameras(config: ml_collections.ConfigDict) -> cameras_lib.Cameras:
  """The config's fixed validation views, evenly around the object."""
  c = config.cameras
  return cameras_lib.orbit_cameras(c.eval_num_views, elevation_deg=c.eval_elevation_deg, radius=c.eval_radius,
                                   fovy_deg=c.eval_fovy_deg)


def make_eval_renderer(scene: scene_lib.Scene, *, height: int, width: int, chunk_size: int):
  """A jitted (params, cameras, level_mask) -> dict of images; compiled once per shape."""
  return jax.jit(functools.partial(scene_lib.render_eval_views, scene, height=height, width=width,
                                   chunk_size=chunk_size))


def validation_grid(renders: dict) -> np.ndarray:
  """Rows rgb / normals / opacity / depth of N views as one uint8 picture."""
  depth = images.depth_to_gray(renders["depth"], renders["opacity"])
  return images.image_grid([renders["rgb"], renders["normals"], renders["opacity"], depth])


def save_untrained_render(config: ml_collections.ConfigDict, path: str) -> str:
  """Initialises the config's scene and writes its validation grid (the blob) to `path`."""
  scene = scene_lib.build_scene(config)
  params = scene.init(state_lib.init_key(config.seed))  # the key runs.setup_run initialises with
  render_fn = make_eval_renderer(scene, height=config.train.eval_height, width=config.train.eval_width,
                                 chunk_size=config.render.eval_chunk)
  renders = render_fn(params, eval_cameras(config), level_mask=scene.level_mask(0))
  images.save_png(path, validation_grid(jax.device_get(renders)))
  return path
