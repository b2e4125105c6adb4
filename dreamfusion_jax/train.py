"""DreamFusion optimisation: the pure train step, its pmap wrapper and the loop.

One step (DreamFusion sec. 3): sample cameras and lights for the global batch, render
this device's share, shade, take the guidance loss (SDS) on the images plus the
regularizers, differentiate w.r.t. the scene parameters only, average gradients
across devices with `pmean`, apply Adam. Every random draw comes from
fold_in(seed key, step) and is made for the whole global batch before each device
takes its slice, so D devices x batch b compute the same update as 1 device x batch
D*b, and a resumed run repeats the randomness of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dreamfusion_jax import cameras as cameras_lib
from dreamfusion_jax import checkpoints, distributed, errors, fields, losses, reference_image, render, runs
from dreamfusion_jax.guidance import diffusion, distill, methods, priors
from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax.state import TrainState

Array = jax.Array
AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static settings of the train step, read once from the config."""

  batch_size: int  # per device
  num_devices: int  # devices sharing the global batch (all processes)
  height: int
  width: int
  camera_kwargs: tuple  # (name, value) pairs for cameras.sample_cameras
  light_distance_range: tuple
  light_perturb: float
  bucket_kwargs: tuple  # (name, value) pairs for cameras.view_bucket
  shading_probs: tuple
  albedo_warmup_steps: int
  background_kind: str
  background_color: tuple
  background_random_prob: float
  orientation: tuple  # (weight, warmup_steps)
  opacity: tuple
  entropy: tuple
  t_min: float
  t_max: float
  t_max_end: float
  t_anneal_steps: int
  perp_neg: bool = False
  guidance_weight: float = 1.0
  # Image-to-3D (config.image set): the input view's camera (elevation_deg,
  # azimuth_deg, radius, fovy_deg) and the weights of its colour and mask losses.
  reference_camera: Optional[tuple] = None
  reference_weights: tuple = (0.0, 0.0)

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.num_devices

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_devices: int) -> "StepSettings":
    c, g, lo = config.cameras, config.guidance, config.loss
    camera_kwargs = (
        ("radius_range", tuple(c.radius_range)), ("elevation_range_deg", tuple(c.elevation_range_deg)),
        ("azimuth_range_deg", tuple(c.azimuth_range_deg)), ("fovy_range_deg", tuple(c.fovy_range_deg)),
        ("camera_perturb", c.camera_perturb), ("center_perturb", c.center_perturb),
        ("up_perturb", c.up_perturb), ("stratified_azimuth", c.stratified_azimuth))
    bucket_kwargs = (("overhead_threshold_deg", c.overhead_threshold_deg),
                     ("front_threshold_deg", c.front_threshold_deg), ("back_threshold_deg", c.back_threshold_deg))
    return cls(
        batch_size=config.train.batch_size, num_devices=num_devices, height=config.render.height,
        width=config.render.width, camera_kwargs=camera_kwargs,
        light_distance_range=tuple(c.light_distance_range), light_perturb=c.light_perturb,
        bucket_kwargs=bucket_kwargs, shading_probs=tuple(config.render.shading_probs),
        albedo_warmup_steps=config.render.albedo_warmup_steps, background_kind=config.background.kind,
        background_color=tuple(config.background.color), background_random_prob=config.background.random_prob,
        orientation=(lo.orientation_weight, lo.orientation_warmup_steps),
        opacity=(lo.opacity_weight, lo.opacity_warmup_steps), entropy=(lo.entropy_weight, lo.entropy_warmup_steps),
        t_min=g.t_min, t_max=g.t_max, t_max_end=g.t_max_end, t_anneal_steps=g.t_anneal_steps,
        perp_neg=bool(g.get("perp_neg", False)), guidance_weight=float(g.get("weight", 1.0)),
        **_reference_settings(config))


def _reference_settings(config: ml_collections.ConfigDict) -> dict:
  if not config.get("image"):
    return {}
  r = config.reference
  return {"reference_camera": (r.elevation_deg, r.azimuth_deg, r.radius, r.fovy_deg),
          "reference_weights": (r.rgb_weight, r.mask_weight)}


def reference_view_losses(scene, params: dict, reference: reference_image.ReferenceConditioning, key: Array, *,
                          settings: StepSettings, level_mask: Optional[Array]) -> dict:
  """Renders the input image's view (albedo, a random solid background) and returns
  {"reference_rgb", "reference_mask"} (losses.reference_view_loss)."""
  elevation, azimuth, radius, fovy = settings.reference_camera
  cam = cameras_lib.orbit_cameras(1, elevation_deg=elevation, radius=radius, fovy_deg=fovy,
                                  start_azimuth_deg=azimuth)
  k_bg, k_render = jax.random.split(key)
  background = jax.random.uniform(k_bg, (1, 3))
  out = scene_lib.render_views(scene, params, cam, height=settings.height, width=settings.width,
                               keys=jax.random.split(k_render, 1), light_positions=cam.positions,
                               shading=jnp.full((1,), render.ALBEDO, jnp.int32), solid_background=background,
                               use_solid_background=jnp.ones((1,), bool), level_mask=level_mask)
  rgb_loss, mask_loss = losses.reference_view_loss(out["rgb"][0], out["opacity"][0], reference.rgb, reference.mask,
                                                   background[0])
  return {"reference_rgb": rgb_loss, "reference_mask": mask_loss}


def _device_slice(tree, offset: Array, size: int):
  """Rows [offset, offset + size) of every leaf's leading axis."""
  return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, offset, size, axis=0), tree)


def _anneal(step: Array, start: float, end: float, steps: int) -> Array:
  if steps <= 0:
    return jnp.asarray(start, jnp.float32)
  frac = jnp.minimum(1.0, step.astype(jnp.float32) / steps)
  return start + (end - start) * frac


def sample_views(key: Array, step: Array, settings: StepSettings) -> dict:
  """All random choices of a step for the global batch of G views.

  Returns:
    dict of cameras (G), light_positions (G, 3), shading (G,), solid_background (G, 3),
    use_solid_background (G,), render_keys (G, 2), guidance_keys (G, 2).
  """
  g = settings.global_batch_size
  k = jax.random.split(key, 7)
  cams = cameras_lib.sample_cameras(k[0], g, **dict(settings.camera_kwargs))
  lights = cameras_lib.sample_lights(k[1], cams, distance_range=settings.light_distance_range,
                                     position_perturb=settings.light_perturb)
  shading = render.sample_shading(k[2], g, settings.shading_probs)
  shading = jnp.where(step < settings.albedo_warmup_steps, render.ALBEDO, shading)
  if settings.background_kind == "fixed":
    solid = jnp.broadcast_to(jnp.asarray(settings.background_color, jnp.float32), (g, 3))
    use_solid = jnp.ones((g,), bool)
  else:
    solid = jax.random.uniform(k[3], (g, 3))
    prob = 1.0 if settings.background_kind == "random" else settings.background_random_prob
    use_solid = jax.random.uniform(k[4], (g,)) < prob
  return {"cameras": cams, "light_positions": lights, "shading": shading, "solid_background": solid,
          "use_solid_background": use_solid, "render_keys": jax.random.split(k[5], g),
          "guidance_keys": jax.random.split(k[6], g)}


def train_step(
    state: TrainState,
    guidance_params: Any,
    prompt_embeddings: Any,
    base_key: Array,
    *,
    scene: scene_lib.Scene,
    guidance: Any,
    method: Any,
    settings: StepSettings,
    tx: optax.GradientTransformation,
    axis_name: Optional[str] = AXIS,
    scene_values: Optional[dict] = None,
) -> tuple[TrainState, dict]:
  """One DreamFusion step on this device's share of the global batch.

  Args:
    state: the scene's TrainState.
    guidance_params: frozen parameters of the 2D prior (an argument, never a constant).
    prompt_embeddings: the run's conditioning (PromptEmbeddings per view bucket, or
      image-to-3D's ReferenceConditioning); `for_views` gives the views' conditioning.
    base_key: the run's PRNG key; this step's key is fold_in(base_key, state.step).
    scene, guidance (the prior), method (the method's module), settings, tx: static.
    axis_name: pmap axis to average over, or None when not mapped.
    scene_values: a multi-scene job's per-scene numbers (multiscene.py), traced
      scalars replacing the static settings: "lr_scale" (the field's updates are
      multiplied by it: optim.lr / the base config's, Adam's step being linear in its
      learning rate), "guidance_scale", and the regularizer weights "orientation",
      "opacity", "entropy". None: the config's values.

  Returns:
    new state and a dict of scalar metrics (already averaged across devices).
  """
  step = state.step
  views = sample_views(jax.random.fold_in(base_key, step), step, settings)
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  views = _device_slice(views, device * settings.batch_size, settings.batch_size)
  # An identity XLA cannot see through: otherwise XLA CPU fuses the camera and light
  # draws into the render's backward pass and recomputes them for every sample, level
  # and corner (~30% of a 32x32 step; 754 -> 318 ms at 64x64). optimization_barrier
  # does not stop that fusion on CPU; a cond on a runtime value does.
  views = jax.lax.cond(step >= 0, lambda v: v, lambda v: jax.tree_util.tree_map(jnp.zeros_like, v), views)
  cams = views["cameras"]
  buckets = cameras_lib.view_bucket(cams.azimuth_deg, cams.elevation_deg, **dict(settings.bucket_kwargs))
  t_range = jnp.stack([jnp.asarray(settings.t_min, jnp.float32),
                       _anneal(step, settings.t_max, settings.t_max_end, settings.t_anneal_steps)])
  cond = prompt_embeddings.for_views(cams, buckets, settings.perp_neg)
  level_mask = scene.level_mask(step)
  values = scene_values or {}
  weights = {name: losses.ramped_weight(step, values.get(name, getattr(settings, name)[0]), getattr(settings, name)[1])
             for name in ("orientation", "opacity", "entropy")}

  # Zeros whose gradient is each view's screen-space positional gradient (Gaussians'
  # densification); None for a NeRF.
  probes = scene.screen_probes(settings.batch_size)

  def loss_fn(params, probes):
    out = scene_lib.render_views(
        scene, params, cams, height=settings.height, width=settings.width, keys=views["render_keys"],
        light_positions=views["light_positions"], shading=views["shading"],
        solid_background=views["solid_background"], use_solid_background=views["use_solid_background"],
        level_mask=level_mask, screen_probes=probes)
    # The guidance method's own parameters (VSD's LoRA), if any, are trained by the same
    # gradient: its loss reaches only them, the surrogate only the scene.
    guidance_loss, guidance_metrics = distill.loss(guidance, method, guidance_params, out["rgb"], cond,
                                                   views["guidance_keys"], t_range, scale=values.get("guidance_scale"),
                                                   state=params.get("guidance"), c2w=cameras_lib.pose_matrices(cams))
    regularizers = {"orientation": jnp.mean(out["orientation"]),
                    "opacity": jnp.mean(out["opacity_sparsity"]),
                    "entropy": jnp.mean(out["opacity_entropy"])}
    total = settings.guidance_weight * guidance_loss + sum(weights[k] * regularizers[k] for k in regularizers)
    if settings.reference_camera is not None:  # image-to-3D: the input view itself
      reference = reference_view_losses(scene, params, prompt_embeddings,
                                        jax.random.fold_in(jax.random.fold_in(base_key, step), 2),
                                        settings=settings, level_mask=level_mask)
      total = total + sum(w * reference[k] for w, k in zip(settings.reference_weights, reference))
      regularizers.update(reference)
    metrics = {"loss": total, "guidance_loss": guidance_loss, **{f"reg_{k}": v for k, v in regularizers.items()},
               **guidance_metrics, "mean_opacity": jnp.mean(out["opacity"]),
               **{k: jnp.mean(v) for k, v in out.get("metrics", {}).items()}}
    return total, (metrics, out.get("pool_views"))

  (grads, probe_grads), (metrics, pool_views) = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(state.params, probes)
  if axis_name:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  grad_norm = optax.tree.norm({k: v for k, v in grads.items() if k != "guidance"})  # the scene's
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(grads))
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  if "lr_scale" in values:
    updates = {**updates, "field": jax.tree_util.tree_map(lambda u: u * values["lr_scale"], updates["field"])}
  new_params = optax.apply_updates(state.params, updates)
  # The representation's upkeep (a Gaussian pool densifies and prunes; a NeRF has none).
  new_params, new_opt_state, scene_metrics = scene.after_update(
      step=step, key=jax.random.fold_in(jax.random.fold_in(base_key, step), 1), params=new_params,
      opt_state=new_opt_state, probe_grads=probe_grads, views=pool_views, height=settings.height,
      width=settings.width, axis_name=axis_name)
  # A non-finite step leaves the parameters and the optimiser's moments untouched:
  # one bad guidance sample must not poison Adam's running averages.
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt_state, state.opt_state),
                         num_skipped=state.num_skipped + (~finite).astype(jnp.int32))
  metrics = dict(metrics, **scene_metrics, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32),
                 t_max=t_range[1], **{f"weight_{k}": v for k, v in weights.items()})
  return new_state, metrics


def make_pmapped_step(scene, guidance, method, settings, tx, devices=None) -> Callable:
  """The train step pmapped over `devices` (default: all local ones): every argument
  carries a leading device axis (see `replicate`); the state is donated."""
  step_fn = functools.partial(train_step, scene=scene, guidance=guidance, method=method, settings=settings, tx=tx,
                              axis_name=AXIS)
  return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,), devices=devices)


class ConfigError(errors.InputError):
  """A config value that cannot work; the message names the field and what is allowed."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects bad values before anything compiles, naming the field and what is allowed."""
  problems = []

  def check(ok, message):
    if not ok:
      problems.append(message)

  r, t, g, c = config.render, config.train, config.guidance, config.cameras
  image = config.get("image", "")
  check(bool(str(config.prompt).strip()) or bool(image),
        "config.prompt is empty: say what to make, e.g. --config.prompt='a hamburger' (or, with a Zero-1-to-3 "
        "model, --config.image=photo.png)")
  if image:
    ref = config.reference
    check(os.path.isfile(image), f"config.image={image!r}: no such file")
    check(ref.rgb_weight >= 0 and ref.mask_weight >= 0, f"config.reference.rgb_weight and mask_weight must be >= 0, "
          f"got {ref.rgb_weight}, {ref.mask_weight}")
    check(ref.radius > 0, f"config.reference.radius must be > 0, got {ref.radius}")
    check(0 < ref.fovy_deg < 180, f"config.reference.fovy_deg must lie inside (0, 180), got {ref.fovy_deg}")
    check(0 <= ref.object_size <= 1, f"config.reference.object_size must lie in [0, 1] (0: the image as it is), "
          f"got {ref.object_size}")
    check(-90 <= ref.elevation_deg <= 90, f"config.reference.elevation_deg must lie in [-90, 90], got "
          f"{ref.elevation_deg}")
    check(not config.guidance.perp_neg, "config.guidance.perp_neg needs a text prompt's views; image-to-3D conditions "
          "on the camera itself")
  for name in ("height", "width", "num_samples"):
    check(r[name] > 0, f"config.render.{name} must be > 0, got {r[name]}")
  check(r.num_importance_samples >= 0, f"config.render.num_importance_samples must be >= 0, got {r.num_importance_samples}")
  check(r.normal_mode in ("analytic", "finite_difference"),
        f"config.render.normal_mode must be analytic or finite_difference, got {r.normal_mode!r}")
  check(len(r.shading_probs) == 3 and min(r.shading_probs) >= 0 and abs(sum(r.shading_probs) - 1.0) < 1e-6,
        f"config.render.shading_probs must be 3 probabilities (albedo, lambertian, textureless) in [0, 1] "
        f"summing to 1, got {tuple(r.shading_probs)}")
  check(g.dtype in ("float32", "bfloat16"), f"config.guidance.dtype must be float32 or bfloat16, got {g.dtype!r}")
  check(0.0 <= g.t_min < g.t_max <= 1.0, f"config.guidance t range must satisfy 0 <= t_min < t_max <= 1, "
        f"got t_min={g.t_min}, t_max={g.t_max}")
  check(g.t_min < g.t_max_end <= 1.0, f"config.guidance.t_max_end must be in (t_min, 1], got {g.t_max_end}")
  check(g.guidance_scale >= 0, f"config.guidance.guidance_scale must be >= 0, got {g.guidance_scale}")
  check(g.get("weight", 1.0) >= 0, f"config.guidance.weight must be >= 0, got {g.get('weight')}")
  check(methods.exists(g.method), f"config.guidance.method must be one of {', '.join(methods.names())} (or a "
        f"dotted module path), got {g.method!r}")
  check(priors.exists(g.prior), f"config.guidance.prior must be one of {', '.join(priors.names())} (or a dotted "
        f"module path), got {g.prior!r}")
  check(g.weighting in diffusion.WEIGHTINGS,
        f"config.guidance.weighting must be one of {', '.join(diffusion.WEIGHTINGS)}, got {g.weighting!r}")
  check(not g.perp_neg or g.view_dependent, "config.guidance.perp_neg needs config.guidance.view_dependent=True "
        "(its negatives are the other views' prompts)")
  check(g.ism_delta_t >= 0 and g.ism_inv_steps >= 1, f"config.guidance.ism_delta_t must be >= 0 and "
        f"ism_inv_steps >= 1, got {g.ism_delta_t}, {g.ism_inv_steps}")
  check(g.vsd_lora_rank >= 1, f"config.guidance.vsd_lora_rank must be >= 1, got {g.vsd_lora_rank}")
  check(g.vsd_lr > 0, f"config.guidance.vsd_lr must be > 0, got {g.vsd_lr}")
  check(t.steps > 0, f"config.train.steps must be > 0, got {t.steps}")
  check(t.batch_size > 0, f"config.train.batch_size must be > 0, got {t.batch_size}")
  for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    check(t[name] > 0, f"config.train.{name} must be > 0, got {t[name]}")
  check(t.mesh_resolution >= 8, f"config.train.mesh_resolution must be >= 8, got {t.mesh_resolution}")
  cl = config.cluster
  check(cl.num_processes >= 0, f"config.cluster.num_processes must be >= 0 (0: auto), got {cl.num_processes}")
  check(cl.process_id >= -1, f"config.cluster.process_id must be >= 0, or -1 for auto, got {cl.process_id}")
  for name in ("peer_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s", "stop_check_every"):
    check(cl[name] > 0, f"config.cluster.{name} must be > 0, got {cl[name]}")
  check(config.optim.lr > 0, f"config.optim.lr must be > 0, got {config.optim.lr}")
  for name in ("radius_range", "elevation_range_deg", "azimuth_range_deg", "fovy_range_deg",
               "light_distance_range"):
    lo, hi = c[name]
    check(lo <= hi, f"config.cameras.{name} must be (low, high) with low <= high, got {tuple(c[name])}")
  check(-90.0 <= c.elevation_range_deg[0] and c.elevation_range_deg[1] <= 90.0,
        f"config.cameras.elevation_range_deg must lie in [-90, 90], got {tuple(c.elevation_range_deg)}")
  representation = config.get("representation", "nerf")
  check(representation in scene_lib.REPRESENTATIONS, f"config.representation must be one of "
        f"{', '.join(scene_lib.REPRESENTATIONS)}, got {representation!r}")
  if representation == "gaussians":
    check("gaussians" in config and "gaussians" in config.optim,
          "config.representation='gaussians' needs config.gaussians and config.optim.gaussians "
          "(start from configs/dreamgaussian.py or configs/toy_gaussians.py)")
    if "gaussians" in config:
      gs = config.gaussians
      check(0 < gs.num_points <= gs.capacity, f"config.gaussians.num_points must be in (0, capacity="
            f"{gs.capacity}], got {gs.num_points}")
      check(gs.tile_size > 0 and gs.tile_capacity > 0, f"config.gaussians.tile_size and tile_capacity must be > 0, "
            f"got {gs.tile_size}, {gs.tile_capacity}")
      check(gs.densify_every > 0 and gs.opacity_reset_every > 0, f"config.gaussians.densify_every and "
            f"opacity_reset_every must be > 0, got {gs.densify_every}, {gs.opacity_reset_every}")
  f = config.field
  check(f.blob_kind in fields.BLOB_KINDS,
        f"config.field.blob_kind must be one of {', '.join(fields.BLOB_KINDS)}, got {f.blob_kind!r}")
  check(f.progressive_start_step >= 0 and f.progressive_update_every >= 1,
        f"config.field.progressive_start_step must be >= 0 and progressive_update_every >= 1, "
        f"got {f.progressive_start_step}, {f.progressive_update_every}")
  check(0 < c.fovy_range_deg[0] and c.fovy_range_deg[1] < 180,
        f"config.cameras.fovy_range_deg must lie inside (0, 180), got {tuple(c.fovy_range_deg)}")
  check(c.radius_range[0] > 0, f"config.cameras.radius_range must be positive, got {tuple(c.radius_range)}")
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))


class MetricWriter:
  """Scalars to TensorBoard event files and metrics.jsonl, from process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter  # optional import: only the writing process needs it

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """An (H, W, 3) uint8 or [0, 1] float image to TensorBoard's image tab."""
    if self.enabled:
      self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def replicate(tree, devices):
  """One copy of every leaf on each device, stacked on a leading device axis as pmap
  expects. Each device receives its copy directly, so no device ever holds all of
  them (jax.device_put_replicated is gone from JAX 0.10)."""
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                        jax.sharding.PartitionSpec(AXIS))

  def copy_to_all(x):
    x = jnp.asarray(x)
    shards = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, shards)

  return jax.tree_util.tree_map(copy_to_all, tree)


def _unreplicate(tree):
  """This process's copy of a replicated pmap output, as host numpy: a local read.
  (`x[0]` would be a computation over every process's devices, which hangs if another
  process is no longer stepping.)"""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def _any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a signal may reach one host only)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _check_same_step(step: int) -> None:
  """Every process must resume from the same step; they differ when the workdir is not
  on storage that every host sees (each host then reads its own, or no, checkpoint)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  steps = np.asarray(multihost_utils.process_allgather(np.asarray([step], np.int64))).ravel()
  if len(set(steps.tolist())) > 1:
    raise errors.InputError(f"the processes of the job resumed from different steps {steps.tolist()}: --workdir must "
                            f"be on storage that every host sees")


def _sync_processes(name: str) -> None:
  """Waits until every process of a multi-process job reaches this point."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Runs (or resumes) a text-to-3D optimisation in `workdir`.

  Writes: config.json, checkpoints/<step>/, metrics.jsonl, tensorboard/, renders/*.png.

  Args:
    config: see configs/dreamfusion.py.
    workdir: output directory; an existing one with checkpoints is resumed.

  Returns:
    the final (unreplicated) TrainState.
  """
  from tqdm import tqdm  # progress bar only in the loop

  from dreamfusion_jax import images, visualize

  # Everything that can reject the command runs before the workdir is touched.
  validate_config(config)
  runs.check_workdir(workdir)
  run = runs.setup_run(config)  # the prior first: a missing model fails before anything compiles
  scene, tx = run.scene, run.tx
  settings = StepSettings.from_config(config, num_devices=jax.device_count())
  state = runs.resume_state(config, workdir, run.state)
  _check_same_step(int(state.step))
  is_writer = jax.process_index() == 0  # only process 0 writes logs, images, config, meshes
  runs.make_workdir(workdir)
  if is_writer:
    runs.write_config(config, workdir)
  _sync_processes("workdir ready")
  checkpointer = checkpoints.Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR), max_to_keep=config.train.keep_checkpoints)

  devices = jax.local_devices()
  p_state = replicate(state, devices)
  p_guidance_params, p_embeddings, p_key = (replicate(run.guidance_params, devices),
                                            replicate(run.embeddings, devices), replicate(run.base_key, devices))
  p_step = make_pmapped_step(scene, run.guidance, run.method, settings, tx)
  eval_render = visualize.make_eval_renderer(scene, height=config.train.eval_height,
                                             width=config.train.eval_width, chunk_size=config.render.eval_chunk)
  eval_cams = visualize.eval_cameras(config)
  writer = MetricWriter(workdir, is_writer)
  t = config.train

  def save_renders(step, state_now):
    if not is_writer:
      return
    params = state_now.params
    renders = jax.device_get(eval_render(params, eval_cams, level_mask=scene.level_mask(step)))
    grid = visualize.validation_grid(renders)
    images.save_png(os.path.join(workdir, "renders", f"step_{step:06d}.png"), grid)
    writer.write_image(step, "renders", grid)

  start = int(state.step)
  last_log_time, last_log_step = time.perf_counter(), start
  step = start
  try:
    with checkpoints.StopRequest() as stop, tqdm(total=t.steps, initial=start, disable=not is_writer, unit="step",
                                      dynamic_ncols=True) as bar:
      while step < t.steps:
        p_state, p_metrics = p_step(p_state, p_guidance_params, p_embeddings, p_key)
        step += 1
        bar.update(1)
        if step % t.log_every == 0 or step == t.steps:
          metrics = {k: float(v) for k, v in _unreplicate(p_metrics).items()}
          now = time.perf_counter()
          metrics["step_time_s"] = (now - last_log_time) / (step - last_log_step)
          last_log_time, last_log_step = now, step
          metrics["num_skipped"] = float(_unreplicate(p_state.num_skipped))
          writer.write(step, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.4g}", skipped=int(metrics["num_skipped"]))
        # Every process saves the same steps. A stop is agreed every stop_check_every steps
        # (a sync of all hosts) and at the last one; one process alone never acts on it.
        stopping = stop.signal is not None
        if jax.process_count() > 1:
          check = step % config.cluster.stop_check_every == 0 or step == t.steps
          stopping = _any_process(stopping) if check else False
        if checkpoints.due(step, every=t.ckpt_every, last=t.steps, stopping=stopping):
          checkpointer.save(step, _unreplicate(p_state))
        if step % t.eval_every == 0 or step == t.steps:
          save_renders(step, _unreplicate(p_state))
        if stopping:
          checkpointer.wait()
          print(f"\nstopped by signal {stop.signal or '(on another process)'} at step {step}; checkpoint saved, "
                "rerun to resume")
          break
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective failed: another process of the job died or lost contact. Every
    # process must restart together; waiting on would only hang at the next barrier.
    raise distributed.PeerLostError(
        f"lost contact with another process of the job at step {step} ({errors.first_line(e)}); the newest "
        f"checkpoint is step {checkpointer.latest_step()}") from None
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  final = _unreplicate(p_state)
  if step >= t.steps and is_writer:
    write_final_outputs(config, scene, final.params, workdir, step)
  return final


def write_final_outputs(config: ml_collections.ConfigDict, scene, params, workdir: str, step: int) -> None:
  """The end of a finished run: the turntable video and the mesh, where the config asks."""
  if config.train.render_video:
    from dreamfusion_jax import video

    paths = video.render_turntable(config, scene, params, os.path.join(workdir, "videos", f"step_{step:06d}"),
                                   step=step)
    print(f"turntable video: {paths['mp4']}")
  if config.train.export_mesh:
    from dreamfusion_jax import export

    try:
      _, mesh_paths, _ = export.export_scene_mesh(config, scene, params,
                                                  os.path.join(workdir, "export", f"mesh_{step:06d}.glb"),
                                                  step=step, resolution=int(config.train.mesh_resolution),
                                                  target_faces=int(config.train.mesh_target_faces))
      print(f"mesh: {mesh_paths[0]}")
    except ValueError as e:  # an empty field: training itself succeeded, so report and return
      print(f"mesh not exported: {e}")
