"""The Gaussian scene's settings, shared by configs/dreamgaussian.py and
configs/toy_gaussians.py: DreamGaussian's values (configs/text.yaml and gs_renderer.py
of github.com/dreamgaussian/dreamgaussian) unless a comment says otherwise."""

import ml_collections


def add_gaussians(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches config `c` to 3D Gaussians and adds `c.gaussians` and `c.optim.gaussians`."""
  c.representation = "gaussians"
  gs = c.gaussians = ml_collections.ConfigDict()
  gs.capacity = 16384  # pool slots (static shape); densification fills free ones
  gs.num_points = 5000  # initial Gaussians, uniform in a ball
  gs.init_radius = 0.5
  gs.init_opacity = 0.1
  gs.tile_size = 16  # pixels per tile side (the reference's BLOCK_X/Y)
  gs.tile_capacity = 256  # Gaussians kept per tile, nearest first; overflow is logged (docs/gaussians.md)
  gs.near = 0.2  # the reference's near plane (camera-space depth)
  gs.densify_from = 0  # densify inside [densify_from, densify_until] (steps taken)
  gs.densify_until = 3000
  gs.densify_every = 50
  gs.opacity_reset_every = 700
  gs.grad_threshold = 0.01  # mean screen-space gradient norm in NDC units
  gs.percent_dense = 0.01  # clone if the largest scale <= percent_dense * extent, else split
  gs.extent = 4.0  # also prunes scales > 0.1 extent
  gs.min_opacity = 0.01
  # DreamGaussian passes max_screen_size=1 with radii from its own rasterizer; our
  # footprints are in pixels, so the screen-size prune is off (0) until measured.
  gs.max_radius_px = 0.0
  gs.mesh_threshold = 1.0  # DreamGaussian's density_thresh on sum_i o_i G_i(x)
  gs.export_block = 256  # Gaussians per block when evaluating the density for export

  o = c.optim.gaussians = ml_collections.ConfigDict()
  # The position's rate is DreamGaussian's position_lr_init / final (1e-3 / 2e-5) times
  # the spatial_lr_scale of 10 its random start uses.
  o.means = 1e-2
  o.means_final = 2e-4
  o.means_decay_steps = 300
  o.log_scales = 5e-3
  o.rotations = 5e-3
  o.opacity_logits = 5e-2
  o.color_logits = 1e-2
  return c
