"""The embedded view-conditioned prior: a small pixel-space Zero-1-to-3 of the toy world.

The same model as guidance/priors/zero123.py loads for the released Zero-1-to-3 weights, at
the toy prior's scale (toy_prior.py) and in pixel space: a UNet on [noisy target
view, input view] (6 channels, 32x32), cross-attention to cc_projection([CLIP image
embedding of the input view, T]) with T the relative camera (zero123.relative_camera)
and a small CLIP vision tower trained with it. Trained by the DDPM epsilon objective
on pairs of views of the same toy object from the toy prior's data set; the
classifier-free dropout zeroes the context and the input view together, which is
exactly the unconditional branch the guidance uses (the reference implementation
trains with the null text embedding and infers with zeros; the toy prior need not
inherit that mismatch).

Saved in the layout `zero123.load_zero123` reads (no vae/), beside the text prior.
Training: scripts/train_prior.py --kind=zero123, resumable like the text prior's.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from dreamfusion_jax import errors, files, toy_prior, toy_world

Array = jax.Array

PRIOR_DIR = pathlib.Path(__file__).parent / "assets" / "toy_zero123"
IMAGE_SIZE = toy_prior.IMAGE_SIZE
TRAINING_STATE = toy_prior.TRAINING_STATE
GUIDANCE_SCALE = 3.0  # Zero-1-to-3's usual CFG scale
EMBED_DIM = 64

UNET_CONFIG = {**toy_prior.UNET_CONFIG, "in_channels": 6, "cross_attention_dim": EMBED_DIM}
IMAGE_ENCODER_CONFIG = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_channels": 3,
    "image_size": IMAGE_SIZE,
    "patch_size": 4,  # 8 x 8 patches
    "hidden_act": "quick_gelu",  # CLIP's
    "layer_norm_eps": 1e-5,
    "projection_dim": EMBED_DIM,
}
PREPROCESSOR_CONFIG = {"crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711]}


def init_params(seed: int, unet_from: str | os.PathLike | None = None) -> dict:
  """Random {"unet", "image_encoder", "cc_projection"} params (numpy, no compile).

  `unet_from`: a text prior directory (toy_prior's layout) whose UNet starts this one,
  as Zero-1-to-3 starts from a Stable Diffusion UNet: every weight copied, the input
  view's new input channels of conv_in zero (expand_conv_in). The image encoder and
  cc_projection stay random (the text prior has neither).
  """
  from dreamfusion_jax.guidance import sd_models
  from dreamfusion_jax.guidance.priors import zero123  # pylint: disable=g-import-not-at-top

  _, unet_shapes = sd_models.unet_from_config(UNET_CONFIG)
  _, encoder_shapes = sd_models.image_encoder_from_config(IMAGE_ENCODER_CONFIG)
  rng = np.random.default_rng(seed + 2)
  fan_in = EMBED_DIM + zero123.CAMERA_DIM
  kernel = (rng.standard_normal((fan_in, EMBED_DIM)) / np.sqrt(fan_in)).astype(np.float32)
  unet = sd_models.random_params(unet_shapes, seed) if unet_from is None else text_prior_unet(unet_from, unet_shapes)
  return {"unet": unet,
          "image_encoder": sd_models.random_params(encoder_shapes, seed + 1),
          "cc_projection": {"projection": {"kernel": kernel, "bias": np.zeros((EMBED_DIM,), np.float32)}}}


def expand_conv_in(kernel: np.ndarray, in_channels: int) -> np.ndarray:
  """A conv kernel (kh, kw, C, O) widened to (kh, kw, in_channels, O) by zeros: the new
  input channels start with no effect (Zero-1-to-3's initialisation of its 8-channel
  conv_in from Stable Diffusion's 4)."""
  kh, kw, c, o = kernel.shape
  if in_channels < c:
    raise ValueError(f"cannot narrow conv_in from {c} to {in_channels} input channels")
  return np.concatenate([kernel, np.zeros((kh, kw, in_channels - c, o), kernel.dtype)], axis=2)


def text_prior_unet(path: str | os.PathLike, unet_shapes) -> dict:
  """The UNet params of the text prior at `path` in this prior's UNet shapes (numpy)."""
  _, params = toy_prior.load(path)
  unet = jax.tree_util.tree_map(np.asarray, jax.device_get(params["unet"]))
  unet["conv_in"]["kernel"] = expand_conv_in(unet["conv_in"]["kernel"], UNET_CONFIG["in_channels"])
  want = jax.tree_util.tree_map(lambda x: tuple(x.shape), unet_shapes)
  got = jax.tree_util.tree_map(lambda x: tuple(x.shape), unet)
  if want != got:
    raise errors.InputError(f"the UNet of {path} does not have this prior's shapes (UNET_CONFIG but "
                            f"in_channels): it cannot start it")
  return unet


def write_prior_dir(path: str | os.PathLike, params: dict, training_state: dict | None = None) -> pathlib.Path:
  """Writes the params as a pixel-space Zero-1-to-3 directory, atomically."""
  from dreamfusion_jax.guidance.priors import zero123  # pylint: disable=g-import-not-at-top

  def write(tmp):
    zero123.write_zero123_dir(tmp, params, fmt="flax", unet_config=UNET_CONFIG, vae_config=None,
                              image_encoder_config=IMAGE_ENCODER_CONFIG, scheduler_config=toy_prior.SCHEDULER_CONFIG,
                              preprocessor_config=PREPROCESSOR_CONFIG)
    if training_state is not None:
      (pathlib.Path(tmp) / TRAINING_STATE).write_text(json.dumps(training_state, indent=2, sort_keys=True))

  files.write_dir_atomically(path, write)
  return pathlib.Path(path)


def load(path: str | os.PathLike = PRIOR_DIR, **settings):
  """The prior as a guidance: (Zero123Guidance, params)."""
  from dreamfusion_jax.guidance.priors import stable_diffusion, zero123  # pylint: disable=g-import-not-at-top

  settings = {"guidance_scale": GUIDANCE_SCALE, **settings}
  return zero123.load_zero123(str(path), settings=stable_diffusion.SDSSettings(image_size=IMAGE_SIZE, **settings))


def sample_pairs(rng: np.random.Generator, num_images: int, per_object: int, batch_size: int) -> tuple:
  """(input, target) row indices of `batch_size` random pairs of views of one object
  (rows object-major, per_object each, as toy_prior.render_dataset writes them)."""
  src = rng.integers(0, num_images, batch_size)
  dst = (src // per_object) * per_object + rng.integers(0, per_object, batch_size)
  return src, dst


def pair_cameras(data: dict, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """(B, 4) zero123.relative_camera of views dst seen from views src."""
  from dreamfusion_jax.guidance.priors import zero123  # pylint: disable=g-import-not-at-top

  cam = lambda i: [data[k][i] for k in toy_prior.CAMERA_FIELDS]
  return np.asarray(zero123.relative_camera(*cam(dst), *cam(src)))


def denoising_loss(guidance, params, abar: Array, x_in: Array, x_target: Array, camera: Array, keep: Array,
                   t: Array, noise: Array) -> Array:
  """||eps - eps_theta(z_t; x_in, T)||^2 with images in [-1, 1] (B, S, S, 3), camera
  (B, 4), keep (B,) 0 where the classifier-free dropout zeroes the conditioning."""
  from dreamfusion_jax.guidance import diffusion  # pylint: disable=g-import-not-at-top
  from dreamfusion_jax.guidance.priors import zero123  # pylint: disable=g-import-not-at-top

  emb = zero123.image_embedding(guidance, params, x_in * 0.5 + 0.5)
  ctx = zero123.context(params, emb, camera) * keep[:, None, None]
  noisy = diffusion.add_noise(abar, x_target, noise, t)
  eps = zero123.predict_noise(guidance, params, noisy, t, ctx, x_in * keep[:, None, None, None])
  return jnp.mean((eps - noise) ** 2)


def make_train_step(guidance, tx, *, uncond_prob: float = 0.1, ema_decay: float = 0.999):
  """Pure (state, alphas_cumprod, input images, target images, cameras (B, 4), key) ->
  (state, loss) on uint8 image pairs."""
  import optax  # pylint: disable=g-import-not-at-top

  def step(state: toy_prior.PriorState, abar, images_in, images_target, camera, key):
    key = jax.random.fold_in(key, state.step)
    k_flip, k_keep, k_t, k_noise = jax.random.split(key, 4)
    x_in = images_in.astype(jnp.float32) / 127.5 - 1.0
    x_target = images_target.astype(jnp.float32) / 127.5 - 1.0
    # Mirroring both views maps every azimuth a to -a (the toy objects are symmetric
    # about the xz plane): the relative azimuth changes sign, i.e. its sine does.
    flip = jax.random.uniform(k_flip, (x_in.shape[0],)) < 0.5
    x_in = jnp.where(flip[:, None, None, None], x_in[:, :, ::-1], x_in)
    x_target = jnp.where(flip[:, None, None, None], x_target[:, :, ::-1], x_target)
    camera = camera.at[:, 1].multiply(jnp.where(flip, -1.0, 1.0))
    keep = (jax.random.uniform(k_keep, (x_in.shape[0],)) >= uncond_prob).astype(jnp.float32)
    t = jax.random.randint(k_t, (x_in.shape[0],), 0, abar.shape[0])
    noise = jax.random.normal(k_noise, x_in.shape)
    loss_fn = lambda p: denoising_loss(guidance, p, abar, x_in, x_target, camera, keep, t, noise)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_f = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))  # EMA warm-up, as toy_prior's
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return toy_prior.PriorState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), loss

  return step


def conditioning_gaps(guidance, params, data: dict, *, per_object: int = 4,
                      timesteps: tuple[int, ...] = (100, 300, 500, 700), seed: int = 0) -> dict:
  """How much the prior uses its two conditions, on `per_object` pairs of each object.

  Each target is noised (the same noise for every condition: paired) and denoised
  given the right input view and camera, the right view with the camera of another
  pair ("camera"), a view of the object of the next shape in the same colour
  ("image"), and nothing. A gap is (mse_other - mse_right) / mse_uncond,
  averaged over `timesteps`: ~0 for a condition the prior ignores.
  """
  rng = np.random.default_rng(seed)
  objects = np.asarray(data["object"])
  n_per = int(np.sum(objects == 0))
  src, dst = [], []
  for k in np.unique(objects):
    s, d = sample_pairs(rng, n_per, n_per, per_object)
    src.append(k * n_per + s)
    dst.append(k * n_per + d)
  src, dst = np.concatenate(src), np.concatenate(dst)
  # The same row of the object of the next shape, same colour (object index + 4).
  other = (src + len(toy_world.COLOR_NAMES) * n_per) % len(objects)
  camera = pair_cameras(data, src, dst)
  x = lambda idx: jnp.asarray(data["images"][idx], jnp.float32) / 127.5 - 1.0
  x_in, x_other, x_target = x(src), x(other), x(dst)
  cams = {"right": camera, "camera": np.roll(camera, 1, axis=0)}
  abar = params["alphas_cumprod"]
  ones = jnp.ones((len(src),))

  @jax.jit
  def mse(t, noise, x_cond, cam, keep):
    tt = jnp.full((len(src),), t, jnp.int32)
    return denoising_loss(guidance, params, abar, x_cond, x_target, cam, keep, tt, noise)

  by_t = {}
  for t in timesteps:
    noise = jax.random.normal(jax.random.PRNGKey(seed * 1000 + t), x_target.shape)
    right = float(mse(t, noise, x_in, cams["right"], ones))
    uncond = float(mse(t, noise, x_in, cams["right"], 0 * ones))
    by_t[int(t)] = {"camera": (float(mse(t, noise, x_in, cams["camera"], ones)) - right) / uncond,
                    "image": (float(mse(t, noise, x_other, cams["right"], ones)) - right) / uncond,
                    "total": (uncond - right) / uncond}
  out = {k: float(np.mean([g[k] for g in by_t.values()])) for k in ("camera", "image", "total")}
  out["by_t"] = by_t
  return out


def novel_views(guidance, params, image: np.ndarray, camera: tuple, targets: np.ndarray, key: Array, *,
                num_steps: int = 20) -> np.ndarray:
  """DDIM samples of one input view (S, S, 3) in [0, 1] seen from `camera`
  (elevation_deg, azimuth_deg, radius), at target cameras (N, 3) in the same units.
  Returns (N, S, S, 3) in [0, 1]."""
  from dreamfusion_jax.guidance import conditioning  # pylint: disable=g-import-not-at-top
  from dreamfusion_jax.guidance.priors import zero123  # pylint: disable=g-import-not-at-top

  cond = guidance.encode_image(params, jnp.asarray(image, jnp.float32), camera)
  targets = jnp.asarray(targets, jnp.float32)
  n = targets.shape[0]
  batch = conditioning.ImageView(
      embedding=jnp.broadcast_to(cond.embedding, (n,) + cond.embedding.shape),
      latents=jnp.broadcast_to(cond.latents, (n,) + cond.latents.shape),
      camera=zero123.relative_camera(targets[:, 0], targets[:, 1], targets[:, 2], *cond.camera),
      keep=jnp.ones((n,), jnp.float32))
  sample = jax.jit(lambda p, c, k: conditioning.sample(guidance, p, c, k, num_steps=num_steps,
                                                        guidance_scale=guidance.settings.guidance_scale))
  return np.asarray(sample(params, batch, key))


def save_sample_grid(guidance, params, data: dict, path: str, *, seed: int = 0) -> np.ndarray:
  """A PNG grid: per object, its first training view, then samples of the views
  turned 90, 180 and 270 degrees about it at the same elevation and distance."""
  from dreamfusion_jax import images  # pylint: disable=g-import-not-at-top

  objects = np.asarray(data["object"])
  rows = []
  for k in np.unique(objects):
    i = int(np.flatnonzero(objects == k)[0])
    el, az, r = (float(data[f][i]) for f in toy_prior.CAMERA_FIELDS)
    targets = np.array([[el, az + d, r] for d in (90.0, 180.0, 270.0)], np.float32)
    views = novel_views(guidance, params, data["images"][i] / 255.0, (el, az, r), targets,
                        jax.random.PRNGKey(seed + int(k)))
    rows.append(np.concatenate([data["images"][i][None] / 255.0, views]))
  grid = images.image_grid([np.concatenate(rows[j:j + 4]) for j in range(0, len(rows), 4)])
  images.save_png(path, grid)
  return grid


def train_prior(workdir: str, *, steps: int, batch_size: int = 32, per_object: int = 256, lr: float = 5e-4,
                warmup_steps: int = 200, seed: int = 0, log_every: int = 50, ckpt_every: int = 250,
                export_every: int = 500, out_dir: str | os.PathLike = PRIOR_DIR,
                warm_start: str | os.PathLike | None = None, export_only: bool = False,
                unet_from: str | os.PathLike | None = None) -> toy_prior.PriorState:
  """Trains (or resumes) the view-conditioned prior in `workdir` and exports its EMA
  weights to `out_dir`; as toy_prior.train_prior (same data set, loop, checkpoints,
  warm start and signals), on pairs of views of one object. A new workdir's UNet
  starts from the text prior at `unet_from` (init_params) or, if None, at random;
  the choice is written once into workdir/init and recorded in every export."""
  from dreamfusion_jax import checkpoints  # pylint: disable=g-import-not-at-top

  work = pathlib.Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  data = toy_prior.load_dataset(work, seed, per_object)
  missing = [f for f in toy_prior.CAMERA_FIELDS if f not in data]
  if missing:
    raise ValueError(f"{work / 'dataset.npz'} has no cameras ({missing}): it was rendered for the text prior "
                     "before cameras were recorded; use a new --workdir")
  init_dir = work / "init"
  if not init_dir.exists():
    write_prior_dir(init_dir, init_params(seed, unet_from),
                    {"unet_from": None if unet_from is None else str(unet_from)})
  unet_init = json.loads((init_dir / TRAINING_STATE).read_text())["unet_from"] if (
      init_dir / TRAINING_STATE).exists() else None
  guidance, gparams = load(init_dir)
  trainable = lambda p: {k: p[k] for k in ("unet", "image_encoder", "cc_projection")}
  tx = toy_prior.make_optimizer(lr, warmup_steps)
  checkpointer = checkpoints.Checkpointer(str(work / "checkpoints"), max_to_keep=2)
  warm, step0 = None, 0
  if warm_start is not None:
    warm = trainable(load(warm_start)[1])
    step0 = json.loads((pathlib.Path(warm_start) / TRAINING_STATE).read_text())["step"]
  state = toy_prior.start_state(trainable(gparams), tx, checkpointer, warm_start_params=warm,
                                warm_start_step=step0)
  abar = gparams["alphas_cumprod"]
  train_step = make_train_step(guidance, tx)
  step_fn = jax.jit(lambda s, *a: train_step(s, abar, *a), donate_argnums=(0,))
  images_all = jnp.asarray(data["images"])
  key = jax.random.PRNGKey(seed)
  gap_data = {k: data[k] for k in ("images", "object", *toy_prior.CAMERA_FIELDS)}

  def export(state):
    ema = {**gparams, **jax.device_get(state.ema_params)}
    gaps = conditioning_gaps(guidance, ema, gap_data)
    out = write_prior_dir(out_dir, trainable(ema),
                          toy_prior.training_record(state, gaps, target_steps=steps, batch_size=batch_size,
                                                    per_object=per_object, lr=lr, seed=seed,
                                                    unet_from=unet_init))
    sample_guidance, sample_params = load(out)
    save_sample_grid(sample_guidance, sample_params, gap_data, str(work / f"samples_{int(state.step):06d}.png"))
    print(f"exported the EMA weights at step {int(state.step)} to {out}; conditioning gaps "
          f"camera {gaps['camera']:.4f} image {gaps['image']:.4f} total {gaps['total']:.4f}", flush=True)

  def batch(step):
    src, dst = sample_pairs(np.random.default_rng([seed, step]), len(data["object"]), per_object, batch_size)
    return images_all[src], images_all[dst], jnp.asarray(pair_cameras(data, src, dst)), key

  return toy_prior.run_training(work, state, step_fn, batch, steps=steps, checkpointer=checkpointer, export=export,
                                log_every=log_every, ckpt_every=ckpt_every, export_every=export_every,
                                export_only=export_only)
