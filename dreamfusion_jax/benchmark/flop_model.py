"""The FLOP model of one SDS iteration at SD-2.1-base shapes: XLA's cost analysis of
the lowered (not compiled, not run) programs on abstract shapes, so any machine can
produce it (docs/performance.md has the numbers)."""

from __future__ import annotations

import copy
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax import state as state_lib
from dreamfusion_jax import train
from dreamfusion_jax.benchmark.measurement import cost_flops
from dreamfusion_jax.benchmark.sd21 import SD21_TEXT_ENCODER_CONFIG, SD21_UNET_CONFIG, SD21_VAE_CONFIG
from dreamfusion_jax.benchmark.step_parts import StepParts, render_fwd_bwd_fn
from dreamfusion_jax.guidance import sd_models


def sd21_flop_model(*, batch_size: int = 1, image_size: int = 512, dtype: str = "float32",
                    render_config: Optional[ml_collections.ConfigDict] = None) -> dict[str, Optional[float]]:
  """FLOPs of one SDS iteration at SD-2.1-base shapes, from XLA's cost analysis of the
  lowered (not compiled, not run) programs on abstract shapes: no weights, no memory.

  Args:
    batch_size: rendered views per iteration.
    image_size: the VAE's input size (512 for SD-2.1-base).
    render_config: a full config whose render/field settings give the render row
      (e.g. configs/dreamfusion.py's default: 64x64 at 64 samples per ray); None: no
      render row.

  Returns:
    {"unet_cfg_fwd", "vae_encode_fwd_bwd", "text_encoder", "render_fwd_bwd"} -> FLOPs.
  """
  jdtype = sd_models.DTYPES[dtype]
  b, n = batch_size, image_size // 8
  unet, unet_shapes = sd_models.unet_from_config(SD21_UNET_CONFIG, jdtype)
  vae, vae_shapes = sd_models.vae_from_config(SD21_VAE_CONFIG, jdtype)
  text_encoder, text_shapes = sd_models.text_encoder_from_config(SD21_TEXT_ENCODER_CONFIG, jdtype)
  cast = lambda tree: jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jdtype), tree)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)

  def unet_cfg(p, z, t, emb):
    return unet.apply({"params": p}, z.astype(jdtype), t, emb.astype(jdtype)).sample

  def vae_fwd_bwd(p, x, cot):
    f = lambda x: vae.apply({"params": p}, x.astype(jdtype), method=vae.encode).latent_dist.mean
    _, vjp = jax.vjp(f, x)
    return vjp(cot.astype(jdtype))[0]

  def text(p, ids):
    return text_encoder(ids, params=p)[0]

  flops = {
      "unet_cfg_fwd": cost_flops(jax.jit(unet_cfg).lower(cast(unet_shapes), f32(2 * b, 4, n, n), i32(2 * b),
                                                         f32(2 * b, 77, 1024))),
      "vae_encode_fwd_bwd": cost_flops(jax.jit(vae_fwd_bwd).lower(cast(vae_shapes), f32(b, 3, image_size, image_size),
                                                                  f32(b, n, n, 4))),
      "text_encoder": cost_flops(jax.jit(text).lower(cast(text_shapes), i32(5, 77))),
  }
  if render_config is not None:
    render_config = copy.deepcopy(render_config)
    render_config.train.batch_size = batch_size
    flops["render_fwd_bwd"] = render_flops(render_config)
  return flops


def render_flops(config: ml_collections.ConfigDict) -> Optional[float]:
  """FLOPs of the render forward+backward of one device's batch (lowered, not run)."""
  scene = scene_lib.build_scene(config)
  settings = train.StepSettings.from_config(config, num_devices=1)
  params = jax.eval_shape(scene.init, jax.random.PRNGKey(0))
  parts = StepParts(config=config, guidance=None, guidance_params=None, method=None, embeddings=None, scene=scene,
                    tx=None,
                    settings=settings, state=state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                              opt_state=None, num_skipped=None),
                    base_key=jax.random.PRNGKey(0))
  fn, args = render_fwd_bwd_fn(parts)
  return cost_flops(fn.lower(*args))
