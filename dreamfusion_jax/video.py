"""Turntable videos of an optimised scene: orbit cameras rendered in fixed-size batches
by one jitted function, written as MP4 and GIF (and PNG frames on request).

Each frame lays the chosen layers (rgb | normals | depth | opacity) side by side; depth
is greyed with one range over the whole video so that it does not flicker. Files are
written atomically (`files.write_atomically`), so a failed render never replaces a good
video.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from dreamfusion_jax import cameras as cameras_lib
from dreamfusion_jax import files, images, runs, visualize
from dreamfusion_jax import scene as scene_lib

VIDEO_LAYERS = ("rgb", "normals", "depth", "opacity")


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
    config, scene, params: the run (as from `runs.restore_scene`, or the loop's state).
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
