"""DreamGaussian (Tang et al. 2023): text-to-3D with 3D Gaussians and Stable Diffusion.

  python scripts/train.py --config=configs/dreamgaussian.py --config.prompt="a hamburger"

Derived from configs/dreamfusion.py: the same guidance, train step, cameras,
checkpoints and exports, with `representation = "gaussians"` and DreamGaussian's stage-1
settings (configs/text.yaml): 500 steps, cameras at radius 2.5 with fovy 49.1 and
elevations in [-30, 30], albedo only, black or white backgrounds (here: random
colours), timestep annealing (here t_max 0.98 -> 0.5 linearly). Stage 2 (mesh
texture refinement) is not ported.
"""

import ml_collections

from dreamfusion_jax import sweep


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  base = sweep.load_sibling_config(__file__, "dreamfusion").get_config()
  c = sweep.load_sibling_config(__file__, "gaussians_defaults").add_gaussians(base)
  c.render.height = c.render.width = 256
  # At 256x256 the starting ball drops 17898 (tile, Gaussian) pairs with 256 per tile and
  # 2664 with 512 (docs/gaussians.md); 1024 is unmeasured on an accelerator.
  c.gaussians.tile_capacity = 1024
  c.render.shading_probs = (1.0, 0.0, 0.0)
  cam = c.cameras
  cam.radius_range = (2.5, 2.5)
  cam.fovy_range_deg = (49.1, 49.1)
  cam.elevation_range_deg = (-30.0, 30.0)
  cam.camera_perturb = cam.center_perturb = cam.up_perturb = 0.0
  cam.eval_radius = 2.5
  cam.eval_fovy_deg = 49.1
  c.background.kind = "random"
  c.loss.orientation_weight = 0.0  # no samples along rays to orient
  c.guidance.t_max_end = 0.5
  c.train.steps = 500
  c.guidance.t_anneal_steps = sweep.follow_steps(c)
  c.train.eval_every = c.train.ckpt_every = 100
  c.train.export_mesh = True
  if variant:
    raise ValueError(f"unknown variant {variant!r} of configs/dreamgaussian.py; known: (none)")
  return c
