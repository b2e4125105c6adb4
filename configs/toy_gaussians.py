"""Text-to-3D with 3D Gaussians and the embedded toy prior: CPU, minutes, no download.

  python scripts/train.py --config=configs/toy_gaussians.py --config.prompt="a blue sphere" --workdir=runs/gs

configs/toy.py (the prior's views, shading, backgrounds, guidance) with
`representation = "gaussians"` and DreamGaussian's pool and learning rates
(configs/gaussians_defaults.py), scaled to the toy's 32x32 images. Unmeasured against
the NeRF toy benchmark yet (docs/gaussians.md).

Variants: "quick" (fewer steps, for tests), "tiny" (a few steps with a small pool: the
end-to-end test).
"""

import os

import ml_collections

from dreamfusion_jax import sweep


def _load(name):
  return sweep.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  toy_variant = "quick" if variant in ("quick", "tiny") else ""
  c = _load("gaussians_defaults").add_gaussians(_load("toy").get_config(toy_variant))
  gs = c.gaussians
  gs.capacity = 8192
  gs.num_points = 2000
  gs.tile_size = 8  # 16 tiles of a 32x32 view
  # Room for the starting ball: at 2000 Gaussians a 32x32 view drops 2499 (tile, Gaussian)
  # pairs with 256 per tile, 1438 with 512, none with 1024 (docs/gaussians.md).
  gs.tile_capacity = 1024
  gs.densify_until = c.train.steps
  # The toy prior's SDS gradients are far larger than Stable Diffusion's latent ones: after
  # 2 steps on "a blue sphere" the mean screen gradient (NDC units) has quartiles
  # 0.30 / 0.58 / 0.98, so DreamGaussian's 0.01 would split every Gaussian at every
  # densify. 1.0 (about the 80th percentile there) is a scale estimate, not a tuned value.
  gs.grad_threshold = 1.0
  gs.opacity_reset_every = 10 * c.train.steps  # DreamGaussian's 700 is past the toy's run: never
  c.loss.orientation_weight = 0.0  # no samples along rays to orient
  # The toy NeRF's sparsity weight (200) was tuned for a volume's per-ray opacity;
  # DreamGaussian has none. Off until measured.
  c.loss.opacity_weight = 0.0
  if variant == "tiny":
    gs.capacity = 512
    gs.num_points = 200
    gs.densify_every = 2
    c.train.steps = 6
    c.train.batch_size = 1
    c.train.log_every = 2
    c.train.eval_every = c.train.ckpt_every = 3
    c.train.eval_height = c.train.eval_width = 16
    c.cameras.eval_num_views = 2
    c.guidance.t_anneal_steps = c.train.steps
    gs.densify_until = c.train.steps
  elif variant not in ("", "quick"):
    raise ValueError(f"unknown variant {variant!r} of configs/toy_gaussians.py; known: quick, tiny")
  return c
