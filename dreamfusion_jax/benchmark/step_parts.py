"""The DreamFusion train step and its parts, built once and ready to time.

`build_step_parts` sets a run up (runs.setup_run: guidance, embeddings, scene,
optimiser, state) without the loop; each `*_fn` returns (jitted function, arguments)
for one row of the benchmark: the full step as trained, the render forward+backward,
the VAE encoder forward+backward, the classifier-free-guided UNet call and the text
encoder. Frozen weights are arguments of every function (never constants), as in
training. `measure_components` and `measure_scaling` time them (measurement.py).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from dreamfusion_jax import runs, train
from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax.benchmark.measurement import Measurement, measure
from dreamfusion_jax.guidance import prompts as prompts_lib
from dreamfusion_jax.guidance import conditioning
from dreamfusion_jax.guidance.priors import stable_diffusion as sd

Array = jax.Array

# The component rows, in the order of the table (and of the PyTorch reference).
COMPONENTS = ("train_step", "render_fwd_bwd", "vae_encode_fwd_bwd", "unet_cfg_fwd", "text_encoder")


@dataclasses.dataclass
class StepParts(runs.RunParts):
  """A run's parts (runs.RunParts) and the step's static settings for a device count."""

  settings: train.StepSettings


def build_step_parts(config: ml_collections.ConfigDict, *, guidance_and_params=None,
                     num_devices: int = 1) -> StepParts:
  """The pieces of `train.train_and_evaluate`'s step, without the loop.

  Args:
    config: a full experiment config (configs/dreamfusion.py).
    guidance_and_params: an already loaded (guidance, params); default: load
      `config.guidance` with its prior module (guidance/priors/).
    num_devices: devices sharing the global batch (StepSettings.num_devices).
  """
  run = runs.setup_run(config, guidance_and_params=guidance_and_params)
  settings = train.StepSettings.from_config(config, num_devices=num_devices)
  return StepParts(**{f.name: getattr(run, f.name) for f in dataclasses.fields(run)}, settings=settings)


def train_step_fn(parts: StepParts, devices: Optional[Sequence[jax.Device]] = None) -> tuple[Callable, tuple]:
  """The train step as trained: jitted (axis_name=None) on one device, pmapped (state
  donated, arguments replicated) on several. Returns (function, arguments); the
  function returns (new state, metrics), so time it with thread_first=True."""
  devices = list(devices or jax.local_devices()[:1])
  args = (parts.state, parts.guidance_params, parts.embeddings, parts.base_key)
  if len(devices) == 1:
    step = jax.jit(functools.partial(train.train_step, scene=parts.scene, guidance=parts.guidance,
                                     method=parts.method,
                                     settings=parts.settings, tx=parts.tx, axis_name=None))
    return step, jax.device_put(args, devices[0])
  step = train.make_pmapped_step(parts.scene, parts.guidance, parts.method, parts.settings, parts.tx, devices=devices)
  return step, tuple(train.replicate(a, devices) for a in args)


def _one_device_views(parts: StepParts) -> dict:
  """The random views of step 0 for this device's batch (the first `batch_size` rows)."""
  views = train.sample_views(jax.random.fold_in(parts.base_key, 0), jnp.zeros((), jnp.int32), parts.settings)
  return jax.tree_util.tree_map(lambda x: x[:parts.settings.batch_size], views)


def render_fwd_bwd_fn(parts: StepParts, *, remat: bool = False) -> tuple[Callable, tuple]:
  """Gradient w.r.t. the scene params of a scalar of the rendered batch: sum(rgb *
  cotangent) + the orientation term, i.e. the render part of the step's backward.

  With `remat`, the render is wrapped in jax.checkpoint: its forward activations are
  recomputed in the backward pass instead of kept (less memory, more FLOPs).
  """
  s = parts.settings
  views = _one_device_views(parts)
  level_mask = parts.scene.level_mask(parts.state.step)
  cotangent = jax.random.uniform(jax.random.PRNGKey(2), (s.batch_size, s.height, s.width, 3))

  def render(params, views):
    out = scene_lib.render_views(
        parts.scene, params, views["cameras"], height=s.height, width=s.width, keys=views["render_keys"],
        light_positions=views["light_positions"], shading=views["shading"],
        solid_background=views["solid_background"], use_solid_background=views["use_solid_background"],
        level_mask=level_mask)
    return out["rgb"], jnp.mean(out["orientation"])

  if remat:
    render = jax.checkpoint(render)

  def scalar(params, views, cotangent):
    rgb, orientation = render(params, views)
    return jnp.sum(rgb * cotangent) + s.orientation[0] * orientation

  # value_and_grad, as the step (which logs the loss): with grad alone, XLA would drop
  # the primal forward pass and remat would cost nothing.
  return jax.jit(jax.value_and_grad(scalar)), (parts.state.params, views, cotangent)


def _rendered_size_images(parts: StepParts) -> Array:
  s = parts.settings
  return jax.random.uniform(jax.random.PRNGKey(3), (s.batch_size, s.height, s.width, 3))


def vae_encode_fwd_bwd_fn(parts: StepParts) -> tuple[Callable, tuple]:
  """VJP of the VAE encoder (resize included) at the rendered size: the path the SDS
  gradient takes back to the images."""
  guidance = parts.guidance
  images = _rendered_size_images(parts)
  n = guidance.latent_size
  cotangent = jax.random.normal(jax.random.PRNGKey(4), (images.shape[0], n, n, guidance.latent_channels))
  key = jax.random.split(jax.random.PRNGKey(5), images.shape[0])

  def fwd_bwd(vae_params, images, cotangent, key):
    _, vjp = jax.vjp(lambda x: sd.encode_images(guidance, vae_params, x, key), images)
    return vjp(cotangent)[0]

  return jax.jit(fwd_bwd), (parts.guidance_params["vae"], images, cotangent, key)


def unet_cfg_fwd_fn(parts: StepParts) -> tuple[Callable, tuple]:
  """The classifier-free-guided noise prediction: one UNet call on the doubled batch."""
  guidance = parts.guidance
  b, n = parts.settings.batch_size, guidance.latent_size
  noisy = jax.random.normal(jax.random.PRNGKey(6), (b, n, n, guidance.latent_channels))
  t = jnp.full((b,), guidance.num_train_timesteps // 2, jnp.int32)
  cond, uncond = prompts_lib.select_embeddings(parts.embeddings, jnp.zeros((b,), jnp.int32))

  def unet_params_only(gparams):  # the VAE and text weights need not travel
    return {"unet": gparams["unet"], "alphas_cumprod": gparams["alphas_cumprod"]}

  fn = jax.jit(lambda p, z, t, c, u: conditioning.guided_noise(guidance, p, z, t, conditioning.TextPair(c, u),
                                                                guidance.settings.guidance_scale))
  return fn, (unet_params_only(parts.guidance_params), noisy, t, cond, uncond)


def text_encoder_fn(parts: StepParts) -> tuple[Callable, tuple]:
  """The text encoder on the run's prompts (4 view prompts + the negative prompt):
  paid once per run, not per step; shown for completeness."""
  guidance, config = parts.guidance, parts.config
  texts = prompts_lib.view_prompts(config.prompt, config.guidance.view_dependent) + (config.guidance.negative_prompt,)
  length = min(guidance.tokenizer.model_max_length, guidance.text_encoder.config.max_position_embeddings)
  ids = guidance.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                           return_tensors="np").input_ids
  fn = jax.jit(lambda p, ids: guidance.text_encoder(ids, params=p)[0])
  return fn, (parts.guidance_params["text_encoder"], jnp.asarray(ids, jnp.int32))


def measure_components(parts: StepParts, *, repeats: int, remat: bool = False,
                       devices: Optional[Sequence[jax.Device]] = None,
                       log: Callable[[str], None] = lambda _: None) -> dict[str, Measurement]:
  """Measures the full step and each of its parts (see COMPONENTS)."""
  gdtype = jnp.dtype(parts.guidance.dtype).name
  results = {}
  log("train step: compiling")
  step, args = train_step_fn(parts, devices)
  results["train_step"] = measure("train_step", step, args, repeats=repeats, thread_first=True, dtype=gdtype)
  log("render fwd+bwd")
  fn, args = render_fwd_bwd_fn(parts, remat=remat)
  results["render_fwd_bwd"] = measure("render_fwd_bwd", fn, args, repeats=repeats)
  log("VAE encode fwd+bwd")
  fn, args = vae_encode_fwd_bwd_fn(parts)
  results["vae_encode_fwd_bwd"] = measure("vae_encode_fwd_bwd", fn, args, repeats=repeats, dtype=gdtype)
  log("UNet CFG fwd")
  fn, args = unet_cfg_fwd_fn(parts)
  results["unet_cfg_fwd"] = measure("unet_cfg_fwd", fn, args, repeats=repeats, dtype=gdtype)
  log("text encoder")
  fn, args = text_encoder_fn(parts)
  results["text_encoder"] = measure("text_encoder", fn, args, repeats=max(3, repeats // 4), dtype=gdtype)
  return results


def measure_scaling(parts: StepParts, *, resolutions: Sequence[int] = (32, 64, 128),
                    samples: Sequence[int] = (16, 32, 64), repeats: int = 3,
                    log: Callable[[str], None] = lambda _: None) -> list[dict]:
  """Train-step time at the config's render settings, then with the render resolution
  (at the config's samples per ray) or the samples per ray (at the config's
  resolution) changed; the guidance input size stays fixed (renders are resized to
  guidance.image_size), so the growth is the renderer's.

  Returns:
    one row per setting, the config's first: height, width, num_samples, points
    (rays x samples per device), median_s, compile_s, flops.
  """
  base = parts.config
  if base.render.height != base.render.width:
    raise ValueError(f"the scaling sweep renders squares; the config renders "
                     f"{base.render.height}x{base.render.width}")
  settings_list = [(base.render.height, base.render.num_samples)]  # the config itself first
  settings_list += [(r, base.render.num_samples) for r in resolutions]
  settings_list += [(base.render.height, n) for n in samples]
  settings_list = list(dict.fromkeys(settings_list))
  rows = []
  for res, num in settings_list:
    config = copy.deepcopy(base)
    config.render.height = config.render.width = res
    config.render.num_samples = num
    log(f"scaling: {res}x{res}, {num} samples per ray")
    scene = scene_lib.build_scene(config)
    p = dataclasses.replace(parts, config=config, scene=scene,
                            settings=train.StepSettings.from_config(config, num_devices=parts.settings.num_devices))
    step, args = train_step_fn(p)
    m = measure("train_step", step, args, repeats=repeats, warmup=1, thread_first=True)
    rows.append({"height": res, "width": res, "num_samples": num,
                 "points": p.settings.batch_size * res * res * (num + config.render.num_importance_samples),
                 "median_s": m.median_s, "compile_s": m.compile_s, "flops": m.flops})
  return rows
