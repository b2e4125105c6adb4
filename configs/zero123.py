"""Image-to-3D with Zero-1-to-3 (Liu et al. 2023): one image in, a 3D object out.

  python scripts/train.py --config=configs/zero123.py --config.image=chair.png \
      --config.guidance.model=DIR --workdir=runs/chair

DIR is a Zero-1-to-3 checkpoint in the diffusers layout (e.g. a download of
kxic/zero123-xl-diffusers: unet/ vae/ image_encoder/ cc_projection/ scheduler/
feature_extractor/), or its hub id when it is in the local Hugging Face cache. The
image: RGBA (alpha is the mask) or RGB on a plain background, any size; it is
recentred (config.reference.object_size, dreamfusion_jax/reference_image.py). It is the view from
config.reference.{elevation_deg, azimuth_deg, radius}; every step renders that view
against it (colour and mask) and Zero-1-to-3 SDS on random views at the same distance
(threestudio's zero123 system: elevation 0, classifier-free guidance 3, t annealed
from 0.98 towards 0.5, albedo renders at first).

Derived from configs/dreamfusion.py; the embedded toy version is configs/toy_zero123.py.
"""

import ml_collections

from dreamfusion_jax import sweep


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sweep.load_sibling_config(__file__, "dreamfusion").get_config()
  c.prompt = "the input image"  # names the run; the image is the condition
  c.image = ""  # required: --config.image=PATH
  g = c.guidance
  g.prior = "zero123"
  g.model = "kxic/zero123-xl-diffusers"
  g.guidance_scale = 3.0
  g.image_size = 256  # Zero-1-to-3 was trained at 256x256 (32x32 latents)
  g.t_max_end = 0.5
  g.view_dependent = False  # no text
  ref = c.reference
  ref.elevation_deg, ref.azimuth_deg, ref.radius, ref.fovy_deg = 0.0, 0.0, 1.8, 40.0
  # A photo is recentred first, its object's longer side 0.8 of the frame, as
  # stable-dreamfusion's preprocess_image.py (border ratio 0.2) does: at radius 1.8 and
  # fovy 40 the frame is 1.31 units wide at the origin, so the object spans ~1.05.
  ref.object_size = 0.8
  cam = c.cameras
  cam.radius_range = (ref.radius, ref.radius)  # zero123's d radius stays 0
  cam.fovy_range_deg = (ref.fovy_deg, ref.fovy_deg)
  cam.elevation_range_deg = (-10.0, 60.0)
  c.render.height = c.render.width = 64
  c.render.albedo_warmup_steps = 500
  c.background.kind = "random"
  c.loss.opacity_weight = 10.0
  t = c.train
  t.steps = 3000
  t.batch_size = 4
  t.eval_every = t.ckpt_every = 500
  t.render_video = t.export_mesh = True
  g.t_anneal_steps = sweep.follow_steps(c)
  if variant:
    raise ValueError(f"unknown variant {variant!r} of configs/zero123.py; it has none")
  return c
