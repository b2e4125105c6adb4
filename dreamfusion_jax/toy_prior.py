"""The embedded prior: a small pixel-space text-to-image diffusion model of the toy world.

Like DreamFusion's Imagen 64x64 base model it denoises RGB directly (no VAE): a small
`FlaxUNet2DConditionModel` (32x32, cross-attention at 16x16 and 8x8) conditioned on a
small CLIP text encoder over a character-level tokenizer, trained jointly with the
DDPM epsilon objective and classifier-free dropout of the text. It is saved in the
diffusers layout without `vae/`, so `guidance.load_stable_diffusion` loads it through
the same code path and SDS loss as Stable Diffusion.

Training (scripts/train_prior.py) renders the data set once with the project's
renderer (toy_world.render_objects) and checkpoints with orbax, so it resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamfusion_jax import errors, files, toy_world
from dreamfusion_jax.guidance import char_tokenizer, pipeline_dir

# The functions that build or run the models import guidance.stable_diffusion /
# sd_models (diffusers, transformers: seconds) on first use: configs/toy.py reads
# PRIOR_DIR and IMAGE_SIZE from here, and parsing a config should not pay for them.

Array = jax.Array

# Where the trained prior ships inside the package.
PRIOR_DIR = pathlib.Path(__file__).parent / "assets" / "toy_prior"
IMAGE_SIZE = 32
TRAINING_STATE = "training_state.json"  # how far the shipped weights were trained
CAMERA_FIELDS = ("elevation_deg", "azimuth_deg", "radius")  # recorded per training image
MAX_LENGTH = 32  # tokens: "a yellow sphere, overhead view" is 30 characters + BOS/EOS

UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    # No attention at 32x32 (1024 tokens would dominate the cost); cross-attention to
    # the text at 16x16 and 8x8.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],  # multiples of 32: diffusers' Flax UNet hard-codes GroupNorm(32)
    "layers_per_block": 1,
    "attention_head_dim": 4,  # read by diffusers as the number of heads
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
SCHEDULER_CONFIG = {  # DDPM's linear schedule (Ho et al. 2020), as for pixel-space models
    "_class_name": "DDIMScheduler",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def text_encoder_config() -> dict[str, Any]:
  vocab_size = char_tokenizer.vocab_size()
  return {
      "architectures": ["CLIPTextModel"],
      "model_type": "clip_text_model",
      "vocab_size": vocab_size,
      "hidden_size": 64,
      "intermediate_size": 128,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "max_position_embeddings": MAX_LENGTH,
      "hidden_act": "gelu",
      "layer_norm_eps": 1e-5,
      "projection_dim": 64,
      "bos_token_id": vocab_size - 2,
      "eos_token_id": vocab_size - 1,
      "pad_token_id": vocab_size - 1,
  }


def write_prior_dir(path: str | os.PathLike, params: dict, training_state: dict | None = None) -> pathlib.Path:
  """Writes {"unet", "text_encoder"} params as a pixel-space diffusers directory,
  atomically (files.write_dir_atomically): a complete directory replaces the old one
  or nothing changes. `training_state` (steps trained, settings) goes to
  TRAINING_STATE beside them."""

  def write(tmp):
    pipeline_dir.write_pipeline_dir(tmp, params, fmt="flax", unet_config=UNET_CONFIG, vae_config=None,
                                    text_encoder_config=text_encoder_config(), scheduler_config=SCHEDULER_CONFIG,
                                    max_length=MAX_LENGTH)
    if training_state is not None:
      (pathlib.Path(tmp) / TRAINING_STATE).write_text(json.dumps(training_state, indent=2, sort_keys=True))

  files.write_dir_atomically(path, write)
  return pathlib.Path(path)


def init_params(seed: int) -> dict:
  """Random {"unet", "text_encoder"} params (fan-in scaled, no compile)."""
  from dreamfusion_jax.guidance import sd_models  # pylint: disable=g-import-not-at-top

  _, unet_shapes = sd_models.unet_from_config(UNET_CONFIG)
  _, text_shapes = sd_models.text_encoder_from_config(text_encoder_config())
  return {"unet": sd_models.random_params(unet_shapes, seed),
          "text_encoder": sd_models.random_params(text_shapes, seed + 1)}


@dataclasses.dataclass(frozen=True)
class PromptTable:
  """Token ids of every prompt the prior is trained on.

  ids[k, 0] is object k's plain prompt ("a red cube"), ids[k, 1 + b] the prompt with
  the suffix of view bucket b ("a red cube, side view"); `empty` the unconditional "".
  """

  ids: np.ndarray  # (K, 5, L) int32
  empty: np.ndarray  # (L,) int32


def prompt_table(tokenizer) -> PromptTable:
  from dreamfusion_jax.guidance.prompts import view_prompts

  texts = [[p, *view_prompts(p)] for p, _, _ in toy_world.all_prompts()]
  flat = [t for row in texts for t in row] + [""]
  ids = tokenizer(flat, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np").input_ids
  ids = np.asarray(ids, np.int32)
  return PromptTable(ids=ids[:-1].reshape(len(texts), 5, -1), empty=ids[-1])


def render_dataset(seed: int, per_object: int, *, chunk: int = 64) -> dict:
  """per_object random views of each of the world's 16 objects at IMAGE_SIZE.

  Returns:
    numpy dict: "images" (N, S, S, 3) uint8, "object" (N,) int32 index into
    toy_world.all_prompts() (object-major: object k's views are rows
    [k per_object, (k + 1) per_object)), "bucket" (N,) int32 view bucket, and the
    cameras' CAMERA_FIELDS (N,) float32.
  """
  objects = toy_world.all_prompts()
  shape_idx = np.repeat([toy_world.SHAPES.index(s) for _, s, _ in objects], per_object).astype(np.int32)
  color_idx = np.repeat([toy_world.COLOR_NAMES.index(c) for _, _, c in objects], per_object).astype(np.int32)
  object_idx = np.repeat(np.arange(len(objects)), per_object).astype(np.int32)
  render_fn = jax.jit(lambda k, s, c: toy_world.render_objects(k, s, c, size=IMAGE_SIZE))
  key = jax.random.PRNGKey(seed)
  n = len(object_idx)
  pad = -n % chunk
  s_all, c_all = np.pad(shape_idx, (0, pad)), np.pad(color_idx, (0, pad))
  fields = ("image", "bucket") + CAMERA_FIELDS
  out = {name: [] for name in fields}
  for start in range(0, n + pad, chunk):
    views = render_fn(jax.random.fold_in(key, start), s_all[start:start + chunk], c_all[start:start + chunk])
    for name in fields:
      out[name].append(np.asarray(views[name]))
  out = {name: np.concatenate(v)[:n] for name, v in out.items()}
  return {"images": np.round(np.clip(out.pop("image"), 0, 1) * 255).astype(np.uint8), "object": object_idx,
          "bucket": out.pop("bucket").astype(np.int32), **{k: v.astype(np.float32) for k, v in out.items()}}


def dataset_signature(seed: int, per_object: int) -> str:
  """What the rendered training set depends on: seed, views per object and the toy
  world's view distribution (a workdir's data and checkpoints belong to one)."""
  views = dataclasses.asdict(toy_world.ViewDistribution())
  return json.dumps({"seed": seed, "per_object": per_object, "views": views}, sort_keys=True)


@flax.struct.dataclass
class PriorState:
  step: Array
  params: Any  # {"unet", "text_encoder"}
  ema_params: Any
  opt_state: Any


def make_optimizer(lr: float, warmup_steps: int) -> optax.GradientTransformation:
  schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                  [warmup_steps])
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def sample_prompt_ids(key: Array, table_ids: Array, empty_ids: Array, objects: Array, buckets: Array, *,
                      uncond_prob: float, view_prob: float) -> Array:
  """Per image: "" with uncond_prob (classifier-free dropout), else the prompt with
  its view suffix with view_prob, else the plain prompt.  Returns (B, L) int32."""
  k_drop, k_view = jax.random.split(key)
  b = objects.shape[0]
  with_view = jax.random.uniform(k_view, (b,)) < view_prob
  ids = table_ids[objects, jnp.where(with_view, 1 + buckets, 0)]
  drop = jax.random.uniform(k_drop, (b,)) < uncond_prob
  return jnp.where(drop[:, None], empty_ids[None], ids)


def make_train_step(guidance, tx, *, uncond_prob: float = 0.1, view_prob: float = 0.5, ema_decay: float = 0.999):
  """Pure (state, alphas_cumprod, table, batch, key) -> (state, loss): the DDPM epsilon
  objective ||eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t, text)||^2."""
  from dreamfusion_jax.guidance import diffusion

  def loss_fn(params, abar, x0, ids, t, noise):
    text = guidance.text_encoder(ids, params=params["text_encoder"])[0]
    noisy = diffusion.add_noise(abar, x0, noise, t)
    out = guidance.unet.apply({"params": params["unet"]}, jnp.transpose(noisy, (0, 3, 1, 2)), t, text).sample
    return jnp.mean((jnp.transpose(out, (0, 2, 3, 1)) - noise) ** 2)

  def step(state: PriorState, abar, table_ids, empty_ids, images, objects, buckets, key):
    key = jax.random.fold_in(key, state.step)
    k_flip, k_ids, k_t, k_noise = jax.random.split(key, 4)
    x0 = images.astype(jnp.float32) / 127.5 - 1.0
    # Mirroring maps azimuth a to -a: the view bucket and the object stay the same.
    flip = jax.random.uniform(k_flip, (x0.shape[0], 1, 1, 1)) < 0.5
    x0 = jnp.where(flip, x0[:, :, ::-1], x0)
    ids = sample_prompt_ids(k_ids, table_ids, empty_ids, objects, buckets, uncond_prob=uncond_prob,
                            view_prob=view_prob)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, abar.shape[0])
    noise = jax.random.normal(k_noise, x0.shape)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, abar, x0, ids, t, noise)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warm-up (as in TF's ExponentialMovingAverage with num_updates): a fixed 0.999
    # would still hold 0.999^500 = 61% of the random initialisation after 500 steps.
    step_f = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return PriorState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), loss

  return step


def conditioning_gaps(guidance, params, images: np.ndarray, objects: np.ndarray, *,
                      timesteps: tuple[int, ...] = (100, 300, 500, 700), num_noise: int = 2,
                      seed: int = 0) -> dict:
  """How much the prompt helps the prior denoise: the use it makes of the text.

  Every image of toy object k is noised (the same noise for every prompt, so the
  comparison is paired) and denoised with the right prompt, with the prompt of
  another shape of the same colour, of another colour of the same shape, and with
  "". A gap is a relative rise of the epsilon MSE over the right prompt's:
  (mse_other - mse_right) / mse_uncond. A prior that ignores a word has a gap of
  ~0 for it; SDS can only carve a shape out of a positive "shape" gap.

  Args:
    images: (N, S, S, 3) uint8 renders; objects: (N,) int32 index into
      toy_world.all_prompts() (as from `render_dataset`).

  Returns:
    {"shape", "color", "text"}: gaps averaged over `timesteps`, and "by_t":
    {t: {"shape", "color", "text"}}.
  """
  from dreamfusion_jax.guidance import diffusion
  from dreamfusion_jax.guidance.priors import stable_diffusion  # pylint: disable=g-import-not-at-top

  objs = toy_world.all_prompts()
  n_shapes, n_colors = len(toy_world.SHAPES), len(toy_world.COLOR_NAMES)
  index = {(s, c): k for k, (_, s, c) in enumerate(objs)}

  def other(k, shape_step, color_step):
    _, s, c = objs[k]
    s2 = toy_world.SHAPES[(toy_world.SHAPES.index(s) + shape_step) % n_shapes]
    c2 = toy_world.COLOR_NAMES[(toy_world.COLOR_NAMES.index(c) + color_step) % n_colors]
    return objs[index[(s2, c2)]][0]

  objects = np.asarray(objects)
  texts = {"right": [objs[k][0] for k in objects], "shape": [other(k, 1, 0) for k in objects],
           "color": [other(k, 0, 1) for k in objects], "uncond": [""] * len(objects)}
  emb = {name: guidance.encode_prompts(params, t) for name, t in texts.items()}
  abar = params["alphas_cumprod"]
  x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0

  @jax.jit
  def mse(t, noise, text):
    tt = jnp.full((x0.shape[0],), t, jnp.int32)
    eps = stable_diffusion.predict_noise(guidance, params, diffusion.add_noise(abar, x0, noise, tt), tt, text)
    return jnp.mean((eps - noise) ** 2)

  by_t = {}
  for t in timesteps:
    sums = {name: 0.0 for name in emb}
    for r in range(num_noise):
      noise = jax.random.normal(jax.random.PRNGKey(seed * 1000 + r), x0.shape)
      for name, e in emb.items():
        sums[name] += float(mse(t, noise, e)) / num_noise
    u = sums["uncond"]
    by_t[int(t)] = {"shape": (sums["shape"] - sums["right"]) / u, "color": (sums["color"] - sums["right"]) / u,
                    "text": (u - sums["right"]) / u}
  out = {k: float(np.mean([g[k] for g in by_t.values()])) for k in ("shape", "color", "text")}
  out["by_t"] = by_t
  return out


def gap_subset(data: dict, per_object: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """The first `per_object` images of every object of a data set: (images, objects)."""
  objects = np.asarray(data["object"])
  idx = np.concatenate([np.flatnonzero(objects == k)[:per_object] for k in np.unique(objects)])
  return np.asarray(data["images"])[idx], objects[idx]


def unfinished_reason(prior_dir: pathlib.Path, name: str = "toy prior") -> str | None:
  """Why the shipped weights in `prior_dir` cannot be judged by an outcome test, or
  None: missing, no training_state.json, or exported before their target step. The
  outcome tests fail on it (never skip): a prior committed half-way must not turn
  them off while CI stays green."""
  state_file = prior_dir / TRAINING_STATE
  if not (prior_dir / "model_index.json").exists():
    return f"the {name} is missing from {prior_dir}"
  if not state_file.exists():
    return f"{state_file} is missing: cannot tell whether the shipped {name} finished training"
  state = json.loads(state_file.read_text())
  if state.get("step", 0) < state.get("target_steps", float("inf")):
    return (f"the shipped {name} is unfinished: step {state.get('step')} of {state.get('target_steps')} in "
            f"{state_file}; finish training it (scripts/train_prior.py) before judging its outcome")
  return None


def load(path: str | os.PathLike = PRIOR_DIR, **settings):
  """The prior as a guidance: (StableDiffusionGuidance, params), pixel space."""
  from dreamfusion_jax.guidance.priors import stable_diffusion  # pylint: disable=g-import-not-at-top

  return stable_diffusion.load_stable_diffusion(
      str(path), settings=stable_diffusion.SDSSettings(image_size=IMAGE_SIZE, **settings))


def sample_images(guidance, params, prompts: list[str], key: Array, *, num_steps: int = 20,
                  guidance_scale: float = 7.5) -> np.ndarray:
  """DDIM samples, one per prompt: (N, IMAGE_SIZE, IMAGE_SIZE, 3) in [0, 1]."""
  from dreamfusion_jax.guidance import conditioning  # pylint: disable=g-import-not-at-top

  emb = guidance.encode_prompts(params, list(prompts) + [""])
  cond = conditioning.TextPair(cond=emb[:-1], uncond=jnp.broadcast_to(emb[-1], emb[:-1].shape))
  sample = jax.jit(lambda p, c, k: conditioning.sample(guidance, p, c, k, num_steps=num_steps,
                                                        guidance_scale=guidance_scale))
  return np.asarray(sample(params, cond, key))


def save_sample_grid(guidance, params, path: str, *, seed: int = 0, per_prompt: int = 2) -> np.ndarray:
  """Writes a PNG grid: one row per shape, `per_prompt` samples per colour."""
  from dreamfusion_jax import images

  prompts = [p for p, _, _ in toy_world.all_prompts() for _ in range(per_prompt)]
  samples = sample_images(guidance, params, prompts, jax.random.PRNGKey(seed))
  cols = len(toy_world.COLOR_NAMES) * per_prompt
  images.save_png(path, images.image_grid([samples[i * cols:(i + 1) * cols] for i in range(len(toy_world.SHAPES))]))
  return samples


def load_dataset(work: pathlib.Path, seed: int, per_object: int) -> dict:
  """`work`/dataset.npz, rendered (render_dataset) on first use; refuses one rendered
  for another signature (dataset_signature), whose checkpoints belong to other data."""
  import time

  data_path = work / "dataset.npz"
  signature = dataset_signature(seed, per_object)
  if not data_path.exists():
    t0 = time.time()
    data = render_dataset(seed, per_object)
    data["signature"] = np.asarray(signature)
    files.write_atomically(data_path, lambda tmp: np.savez(tmp, **data))
    print(f"rendered {len(data['object'])} training images in {time.time() - t0:.0f} s", flush=True)
  data = dict(np.load(data_path))
  found = str(data.pop("signature", "(none: rendered before the signature was recorded)"))
  if found != signature:
    raise errors.InputError(f"{data_path} was rendered for {found}, not {signature}: "
                           "use a new --workdir (its checkpoints belong to that data)")
  return data


def training_record(state: PriorState, gaps: dict, **settings) -> dict:
  """An export's training_state.json: the step, the run's settings (target_steps,
  batch_size, per_object, lr, seed), the data's view distribution and the gaps."""
  return {"step": int(state.step), **settings, "views": dataclasses.asdict(toy_world.ViewDistribution()),
          "conditioning_gaps": {k: round(v, 5) for k, v in gaps.items() if k != "by_t"}}


def run_training(work: pathlib.Path, state: PriorState, step_fn, batch_fn, *, steps: int, checkpointer, export,
                 log_every: int, ckpt_every: int, export_every: int, export_only: bool = False) -> PriorState:
  """The loop of a prior's training, from state.step to `steps`: state, loss =
  step_fn(state, *batch_fn(step)); logs to metrics.jsonl, checkpoints, calls
  export(state) every export_every steps, at a stop signal (then returns: rerun to
  resume) and at the end. `export_only`: export(state) and return."""
  import time

  from dreamfusion_jax import checkpoints

  if export_only:
    export(state)
    checkpointer.close()
    return state

  log = open(work / "metrics.jsonl", "a")
  t_last, losses = time.time(), []
  with checkpoints.StopRequest() as stop:
    for step in range(int(state.step), steps):
      state, loss = step_fn(state, *batch_fn(step))
      losses.append(loss)
      done = step + 1
      if done % log_every == 0:
        mean_loss = float(np.mean(jax.device_get(losses)))
        rate = (time.time() - t_last) / len(losses)
        print(f"step {done}/{steps} loss {mean_loss:.4f} ({rate:.2f} s/step, "
              f"eta {rate * (steps - done) / 60:.0f} min)", flush=True)
        log.write(json.dumps({"step": done, "loss": mean_loss, "step_time_s": rate}) + "\n")
        log.flush()
        t_last, losses = time.time(), []
      if checkpoints.due(done, every=ckpt_every, last=steps, stopping=stop.signal is not None):
        checkpointer.save(done, state)
      if done % export_every == 0 or stop.signal is not None:
        checkpointer.wait()
        export(state)
      if stop.signal is not None:
        print(f"stopped by signal {stop.signal} at step {done}; rerun to resume", flush=True)
        break
  checkpointer.wait()
  if stop.signal is None and int(state.step) % export_every != 0:  # the final weights (or a no-op rerun)
    export(state)
  checkpointer.close()
  log.close()
  return state


def start_state(params: dict, tx, checkpointer, *, warm_start_params: dict | None = None,
                warm_start_step: int = 0) -> PriorState:
  """Step 0 from `params`, the checkpoint in `checkpointer` if any (bit-exact
  resume), else warm_start_params at warm_start_step with fresh Adam moments."""
  if checkpointer.latest_step() is None and warm_start_params is not None:
    params = warm_start_params
  # The EMA starts as a copy: params and ema_params are donated, so they must not share buffers.
  state = PriorState(step=jnp.zeros((), jnp.int32), params=params,
                     ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=tx.init(params))
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state)
    print(f"resumed the prior at step {int(state.step)}", flush=True)
  elif warm_start_params is not None:
    state = state.replace(step=jnp.asarray(warm_start_step, jnp.int32))
    print(f"warm-started the prior at step {warm_start_step} (fresh optimiser state)", flush=True)
  return state


def train_prior(workdir: str, *, steps: int, batch_size: int = 32, per_object: int = 256, lr: float = 5e-4,
                warmup_steps: int = 200, seed: int = 0, log_every: int = 50, ckpt_every: int = 250,
                export_every: int = 500, out_dir: str | os.PathLike = PRIOR_DIR,
                warm_start: str | os.PathLike | None = None, export_only: bool = False) -> PriorState:
  """Trains (or resumes) the prior in `workdir`; exports EMA weights to `out_dir`.

  Batches are a function of (seed, step) only, so a run resumed from its checkpoint
  is the same run. Without a checkpoint, `warm_start` (a prior directory, e.g. the
  shipped one) initialises the weights and the step count from its
  training_state.json, with fresh Adam moments: training continues on a machine that
  has only the committed weights (not bit-exact, since the optimiser state is lost).
  `export_only` writes the latest checkpoint's EMA weights to `out_dir` and returns.
  """
  from dreamfusion_jax import checkpoints

  work = pathlib.Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  data = load_dataset(work, seed, per_object)
  init_dir = work / "init"
  if not init_dir.exists():
    write_prior_dir(init_dir, init_params(seed))
  guidance, gparams = load(init_dir)
  table = prompt_table(guidance.tokenizer)
  tx = make_optimizer(lr, warmup_steps)
  checkpointer = checkpoints.Checkpointer(str(work / "checkpoints"), max_to_keep=2)
  warm, step0 = None, 0
  if warm_start is not None:
    _, warm = load(warm_start)
    warm = {"unet": warm["unet"], "text_encoder": warm["text_encoder"]}
    step0 = json.loads((pathlib.Path(warm_start) / TRAINING_STATE).read_text())["step"]
  state = start_state({"unet": gparams["unet"], "text_encoder": gparams["text_encoder"]}, tx, checkpointer,
                      warm_start_params=warm, warm_start_step=step0)

  step_fn = jax.jit(make_train_step(guidance, tx), donate_argnums=(0,))
  abar = gparams["alphas_cumprod"]
  table_ids, empty_ids = jnp.asarray(table.ids), jnp.asarray(table.empty)
  images_all, objects_all, buckets_all = (jnp.asarray(data["images"]), jnp.asarray(data["object"]),
                                          jnp.asarray(data["bucket"]))
  key = jax.random.PRNGKey(seed)
  gap_images, gap_objects = gap_subset(data)

  def export(state):
    ema = jax.device_get(state.ema_params)
    gaps = conditioning_gaps(guidance, {**gparams, **ema}, gap_images, gap_objects)
    out = write_prior_dir(out_dir, ema, training_record(state, gaps, target_steps=steps, batch_size=batch_size,
                                                        per_object=per_object, lr=lr, seed=seed))
    sample_guidance, sample_params = load(out)
    save_sample_grid(sample_guidance, sample_params, str(work / f"samples_{int(state.step):06d}.png"))
    print(f"exported the EMA weights at step {int(state.step)} to {out}; conditioning gaps "
          f"shape {gaps['shape']:.4f} colour {gaps['color']:.4f} text {gaps['text']:.4f}", flush=True)

  def batch(step):
    idx = np.random.default_rng([seed, step]).integers(0, len(data["object"]), batch_size)
    return abar, table_ids, empty_ids, images_all[idx], objects_all[idx], buckets_all[idx], key

  return run_training(work, state, step_fn, batch, steps=steps, checkpointer=checkpointer, export=export,
                      log_every=log_every, ckpt_every=ckpt_every, export_every=export_every, export_only=export_only)
