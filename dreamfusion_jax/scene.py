"""The optimised scene: field and background built from config, rendered per camera.

`Scene` is static (hashable module definitions and render settings); its parameters
are a separate pytree {"field": ..., "background": ...}. Rendering a batch of cameras
vmaps over images, and every image draws its randomness from its own key, so a batch
split across devices renders exactly what the whole batch renders on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from dreamfusion_jax import cameras as cameras_lib
from dreamfusion_jax import encoding, fields, losses, render

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RenderSettings:
  """Static rendering settings (hashable: part of the compiled function)."""

  num_samples: int = 64
  num_importance_samples: int = 0
  bound: float = 1.0
  normal_mode: str = "analytic"
  ambient: float = 0.1
  diffuse: float = 0.9

  @classmethod
  def from_config(cls, r: ml_collections.ConfigDict) -> "RenderSettings":
    return cls(num_samples=r.num_samples, num_importance_samples=r.num_importance_samples, bound=r.bound,
               normal_mode=r.normal_mode, ambient=r.ambient, diffuse=r.diffuse)


@dataclasses.dataclass(frozen=True)
class Scene:
  """Module definitions and settings of the 3D scene (no parameters)."""

  field: fields.NeRFField
  background: Optional[fields.BackgroundMLP]
  settings: RenderSettings
  progressive_start_levels: int
  progressive_update_every: int
  progressive_start_step: int

  def init(self, key: Array) -> dict:
    """Fresh parameters {"field": ..., "background": ...} (background {} if not an MLP)."""
    k_field, k_bg = jax.random.split(key)
    params = {"field": self.field.init(k_field, jnp.zeros((1, 3)))["params"], "background": {}}
    if self.background is not None:
      params["background"] = self.background.init(k_bg, jnp.zeros((1, 3)))["params"]
    return params

  def level_mask(self, step: Array) -> Optional[Array]:
    """Hash-grid levels enabled at `step` (None: all, or not a hash grid)."""
    cfg = self.field.hash_grid
    if self.field.encoding != "hashgrid" or self.progressive_start_levels >= cfg.num_levels:
      return None
    return encoding.progressive_level_mask(step, num_levels=cfg.num_levels,
                                           start_levels=self.progressive_start_levels,
                                           update_every=self.progressive_update_every,
                                           start_step=self.progressive_start_step)

  def field_fn(self, params: dict, level_mask: Optional[Array] = None):
    """The field as a plain function positions (..., 3) -> (density, albedo)."""
    return lambda x: self.field.apply({"params": params["field"]}, x, level_mask)

  def background_colors(self, params: dict, directions: Array) -> Array:
    """Learned background for ray directions (..., 3) -> (..., 3) colours."""
    return self.background.apply({"params": params["background"]}, directions)

  # The representation's hooks around the optimiser step (gaussians/scene.py has the
  # other implementation): a NeRF has no screen-space probes and no upkeep.
  def screen_probes(self, batch_size: int) -> None:
    del batch_size
    return None

  def after_update(self, *, params: dict, opt_state, **unused) -> tuple[dict, object, dict]:
    del unused
    return params, opt_state, {}


REPRESENTATIONS = ("nerf", "gaussians")


def build_scene(config: ml_collections.ConfigDict):
  """The scene of `config.representation`: a NeRF (`Scene`, from `config.field`,
  `config.background` and `config.render`) or 3D Gaussians (gaussians/scene.py)."""
  representation = config.get("representation", "nerf")  # runs written before the switch are NeRFs
  if representation == "gaussians":
    from dreamfusion_jax.gaussians import scene as gaussian_scene  # pylint: disable=import-outside-toplevel

    return gaussian_scene.build_scene(config)
  if representation != "nerf":
    raise ValueError(f"config.representation must be one of {', '.join(REPRESENTATIONS)}; got {representation!r}")
  f = config.field
  fields.check_blob_kind(f.blob_kind)  # before anything traces: one line naming the field
  field = fields.NeRFField(
      encoding=f.encoding,
      hash_grid=encoding.HashGridConfig(num_levels=f.num_levels, features_per_level=f.features_per_level,
                                        log2_table_size=f.log2_table_size, base_resolution=f.base_resolution,
                                        max_resolution=f.max_resolution),
      num_frequencies=f.num_frequencies,
      hidden_dim=f.hidden_dim,
      num_layers=f.num_layers,
      density_activation=f.density_activation,
      blob_kind=f.blob_kind,
      blob_strength=f.blob_strength,
      blob_radius=f.blob_radius,
      bound=config.render.bound,
  )
  bg = config.background
  if bg.kind not in ("mlp", "fixed", "random"):
    raise ValueError(f"config.background.kind must be mlp, fixed or random; got {bg.kind!r}")
  background = (fields.BackgroundMLP(num_frequencies=bg.num_frequencies, hidden_dim=bg.hidden_dim)
                if bg.kind == "mlp" else None)
  return Scene(field=field, background=background, settings=RenderSettings.from_config(config.render),
               progressive_start_levels=f.progressive_start_levels,
               progressive_update_every=f.progressive_update_every,
               progressive_start_step=f.progressive_start_step)


def render_views(
    scene: Scene,
    params: dict,
    cams: cameras_lib.Cameras,
    *,
    height: int,
    width: int,
    keys: Optional[Array],
    light_positions: Array,
    shading: Array,
    solid_background: Array,
    use_solid_background: Array,
    level_mask: Optional[Array] = None,
    screen_probes: Optional[Array] = None,
) -> dict:
  """Renders B training views and the per-image regularizer terms.

  Args:
    scene, params: the scene and its parameters.
    cams: B cameras.
    height, width: image size.
    keys: (B, 2) one PRNG key per image for stratified jitter, or None (bin midpoints).
    light_positions: (B, 3). shading: (B,) int modes (render.SHADING_MODES).
    solid_background: (B, 3) colours used where `use_solid_background` (B,) is true,
      or always when the scene has no background MLP.
    level_mask: progressive hash-grid mask.
    screen_probes: the representation's `screen_probes` (None for a NeRF).

  Returns:
    dict with "rgb" (B, H, W, 3), "opacity" (B, H, W), "depth" (B, H, W),
    "normals" (B, H, W, 3), and per-image (B,) "orientation", "opacity_sparsity",
    "opacity_entropy"; another representation may add "metrics" (per-image scalars to
    log) and what its `after_update` reads.
  """
  if not isinstance(scene, Scene):  # another representation renders itself
    return scene.render_views(params, cams, height=height, width=width, keys=keys, light_positions=light_positions,
                              shading=shading, solid_background=solid_background,
                              use_solid_background=use_solid_background, level_mask=level_mask,
                              screen_probes=screen_probes)
  origins, directions = cameras_lib.generate_rays(cams, height, width)
  field_fn = scene.field_fn(params, level_mask)
  s = scene.settings
  deterministic = keys is None

  def one_image(o, d, key, light, mode, solid, use_solid):
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    if scene.background is None:
      bg = jnp.broadcast_to(solid, d.shape)
    else:
      bg = jnp.where(use_solid, solid, scene.background_colors(params, d))
    out = render.render_rays(field_fn, o, d, key=key, num_samples=s.num_samples, bound=s.bound,
                             deterministic=deterministic, num_importance_samples=s.num_importance_samples,
                             normal_mode=s.normal_mode, light_positions=light, shading=mode,
                             ambient=s.ambient, diffuse=s.diffuse, background=bg)
    return {
        "rgb": out.rgb.reshape(height, width, 3),
        "opacity": out.opacity.reshape(height, width),
        "depth": out.depth.reshape(height, width),
        "normals": out.normals.reshape(height, width, 3),
        "orientation": losses.orientation_loss(out.weights, out.sample_normals, d),
        "opacity_sparsity": losses.opacity_loss(out.opacity),
        "opacity_entropy": losses.opacity_entropy_loss(out.opacity),
    }

  key_axis = None if deterministic else 0
  return jax.vmap(one_image, in_axes=(0, 0, key_axis, 0, 0, 0, 0))(
      origins, directions, keys, light_positions, shading, solid_background, use_solid_background)


def render_eval_views(
    scene: Scene,
    params: dict,
    cams: cameras_lib.Cameras,
    *,
    height: int,
    width: int,
    chunk_size: int = 4096,
    shading: int = render.ALBEDO,
    level_mask: Optional[Array] = None,
) -> dict:
  """Deterministic renders of fixed views in ray chunks (bounded memory), for
  validation images and videos. The light sits at the camera.

  Returns:
    dict of "rgb" (B, H, W, 3), "opacity" (B, H, W), "depth" (B, H, W) and
    "normals" (B, H, W, 3) with unit normals composited as colours in [0, 1]
    ((n + 1) / 2 over a white background).
  """
  if not isinstance(scene, Scene):  # another representation renders itself
    return scene.render_eval_views(params, cams, height=height, width=width, chunk_size=chunk_size,
                                   shading=shading, level_mask=level_mask)
  origins, directions = cameras_lib.generate_rays(cams, height, width)
  b = origins.shape[0]
  light = jnp.broadcast_to(cams.positions[:, None, None, :], origins.shape)
  field_fn = scene.field_fn(params, level_mask)
  s = scene.settings

  def chunk_fn(o, d, lp):
    bg = (jnp.ones_like(d) if scene.background is None else scene.background_colors(params, d))
    out = render.render_rays(field_fn, o, d, key=None, num_samples=s.num_samples, bound=s.bound,
                             deterministic=True, num_importance_samples=s.num_importance_samples,
                             normal_mode=s.normal_mode, light_positions=lp, shading=shading,
                             ambient=s.ambient, diffuse=s.diffuse, background=bg)
    n = out.normals / jnp.maximum(jnp.linalg.norm(out.normals, axis=-1, keepdims=True), 1e-6)
    normal_rgb = out.opacity[:, None] * (n + 1.0) * 0.5 + (1.0 - out.opacity[:, None])
    return {"rgb": out.rgb, "opacity": out.opacity, "depth": out.depth, "normals": normal_rgb}

  flat = render.map_in_chunks(chunk_fn, min(chunk_size, b * height * width), origins.reshape(-1, 3),
                              directions.reshape(-1, 3), light.reshape(-1, 3))
  return jax.tree_util.tree_map(lambda x: x.reshape((b, height, width) + x.shape[1:]), flat)
