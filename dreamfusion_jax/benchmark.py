"""Performance of the DreamFusion train step: timing, XLA cost analysis, tables.

What one SDS iteration costs, measured on the current JAX device:

  * the full train step (`train.train_step` jitted with axis_name=None on one device,
    or the pmapped step on all local devices), and separately its parts: the render
    forward+backward, the VAE encoder forward+backward, the classifier-free-guided
    UNet forward (one call on the doubled batch) and the text encoder (run once per
    prompt, not per step);
  * FLOPs per call from XLA's cost analysis of the compiled program, achieved FLOP/s,
    and the fraction of a measured matmul peak on the same device (MFU);
  * compile time, compiled temporary memory, and the device's peak memory where the
    backend reports it (CPU does not);
  * step time against render resolution and samples per ray (`scaling`).

Every timing is the median of `repeats` calls after warm-up, each call ended with
`jax.block_until_ready`. Frozen weights are arguments of every timed function (never
constants), as in training. `scripts/benchmark.py` is the command line; `docs/
performance.md` has the FLOP model of a full-size (SD-2.1-base) iteration.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import pathlib
import statistics
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax import runs, train
from dreamfusion_jax import state as state_lib
from dreamfusion_jax.guidance import prompts as prompts_lib

Array = jax.Array

# The component rows, in the order of the table (and of the PyTorch reference).
COMPONENTS = ("train_step", "render_fwd_bwd", "vae_encode_fwd_bwd", "unet_cfg_fwd", "text_encoder")
DESCRIPTIONS = {
    "train_step": "full train step",
    "render_fwd_bwd": "render fwd+bwd",
    "vae_encode_fwd_bwd": "VAE encode fwd+bwd",
    "unet_cfg_fwd": "UNet CFG fwd (2B)",
    "text_encoder": "text encoder (once)",
}

# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass(frozen=True)
class Measurement:
  """Timings and static costs of one compiled function.

  Attributes:
    name: what was timed (one of COMPONENTS, or free text).
    times_s: wall-clock seconds of each timed call (after warm-up).
    compile_s: seconds to trace, lower and compile (None if not compiled here).
    flops: floating-point operations per call from XLA's cost analysis (None if the
      backend gives none).
    temp_bytes: the compiled program's temporary buffers (None if not reported).
    dtype: the dtype the bulk of the FLOPs run in, to pick the matching peak.
  """

  name: str
  times_s: tuple[float, ...]
  compile_s: Optional[float] = None
  flops: Optional[float] = None
  temp_bytes: Optional[int] = None
  dtype: str = "float32"

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    return min(self.times_s)

  @property
  def flops_per_s(self) -> Optional[float]:
    return None if self.flops is None else self.flops / self.median_s

  def mfu(self, peak_flops_per_s: Optional[float]) -> Optional[float]:
    """Achieved FLOP/s as a fraction of `peak_flops_per_s` (None if either is unknown)."""
    if self.flops_per_s is None or not peak_flops_per_s:
      return None
    return self.flops_per_s / peak_flops_per_s

  def to_json(self, peak_flops_per_s: Optional[float] = None) -> dict:
    return {"name": self.name, "median_s": self.median_s, "min_s": self.min_s, "runs": len(self.times_s),
            "times_s": list(self.times_s), "compile_s": self.compile_s, "flops": self.flops,
            "flops_per_s": self.flops_per_s, "mfu": self.mfu(peak_flops_per_s), "temp_bytes": self.temp_bytes,
            "dtype": self.dtype}


def cost_flops(compiled_or_lowered) -> Optional[float]:
  """FLOPs of a compiled (or lowered) XLA program from its cost analysis.

  jax returns a dict (jax 0.10 on CPU), a list with one dict per program (older
  versions, some backends) or None; the list's entries are summed.
  """
  analysis = compiled_or_lowered.cost_analysis()
  if analysis is None:
    return None
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = [a.get("flops") for a in analysis if a]
  flops = [f for f in flops if f is not None and f >= 0]
  return float(sum(flops)) if flops else None


def temp_bytes(compiled) -> Optional[int]:
  """Temporary buffer bytes of a compiled program (XLA's memory analysis), if known."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None
  if stats is None:
    return None
  return int(getattr(stats, "temp_size_in_bytes", 0))


def device_peak_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
  """The device's high-water mark of allocated bytes, or None (CPU reports nothing)."""
  stats = (device or jax.local_devices()[0]).memory_stats()
  if not stats:
    return None
  return stats.get("peak_bytes_in_use")


def time_calls(fn: Callable, args: Sequence, *, repeats: int, warmup: int = 2,
               thread_first: bool = False) -> tuple[float, ...]:
  """Wall-clock seconds of `repeats` calls fn(*args), each ended by block_until_ready.

  Args:
    fn: a compiled or jitted function.
    thread_first: feed output[0] back as the first argument (a train step's state,
      which may be donated).
  """
  args = list(args)
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - start)
    if thread_first:
      args[0] = out[0]
  return tuple(times)


def measure(name: str, fn: Callable, args: Sequence, *, repeats: int, warmup: int = 2, thread_first: bool = False,
            dtype: str = "float32") -> Measurement:
  """Compiles `fn` (a jax.jit or jax.pmap function) for `args` (timed), reads its cost
  and memory analyses, then times `repeats` calls of the compiled program."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  times = time_calls(compiled, args, repeats=repeats, warmup=warmup, thread_first=thread_first)
  return Measurement(name=name, times_s=times, compile_s=compile_s, flops=cost_flops(compiled),
                     temp_bytes=temp_bytes(compiled), dtype=dtype)


def matmul_peak(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 10,
                device: Optional[jax.Device] = None) -> Measurement:
  """A large square matmul on `device`: its FLOP/s (at the fastest run) is the peak the
  MFU column divides by.

  Returns:
    Measurement named "matmul_<n>_<dtype>" with flops = 2 n^3.
  """
  device = device or jax.local_devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype), device)
  b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype), device)
  m = measure(f"matmul_{n}_{jnp.dtype(dtype).name}", jax.jit(jnp.dot), (a, b), repeats=repeats,
              dtype=jnp.dtype(dtype).name)
  return dataclasses.replace(m, flops=2.0 * n**3)  # exact; XLA may report the same or omit it


# ----------------------------------------------------------------------------- the step and its parts


@dataclasses.dataclass
class StepParts:
  """Everything a train step needs, built once: config, guidance, scene, state."""

  config: ml_collections.ConfigDict
  guidance: Any
  guidance_params: Any
  embeddings: prompts_lib.PromptEmbeddings
  scene: scene_lib.Scene
  tx: Any
  settings: train.StepSettings
  state: state_lib.TrainState
  base_key: Array


def build_step_parts(config: ml_collections.ConfigDict, *, guidance_and_params=None,
                     num_devices: int = 1) -> StepParts:
  """The pieces of `train.train_and_evaluate`'s step, without the loop.

  Args:
    config: a full experiment config (configs/dreamfusion.py).
    guidance_and_params: an already loaded (guidance, params); default: load
      `config.guidance` with `guidance.from_config`.
    num_devices: devices sharing the global batch (StepSettings.num_devices).
  """
  run = runs.setup_run(config, guidance_and_params=guidance_and_params)
  settings = train.StepSettings.from_config(config, num_devices=num_devices)
  return StepParts(config=config, guidance=run.guidance, guidance_params=run.guidance_params,
                   embeddings=run.embeddings, scene=run.scene, tx=run.tx, settings=settings, state=run.state,
                   base_key=run.base_key)


def train_step_fn(parts: StepParts, devices: Optional[Sequence[jax.Device]] = None) -> tuple[Callable, tuple]:
  """The train step as trained: jitted (axis_name=None) on one device, pmapped (state
  donated, arguments replicated) on several. Returns (function, arguments); the
  function returns (new state, metrics), so time it with thread_first=True."""
  devices = list(devices or jax.local_devices()[:1])
  args = (parts.state, parts.guidance_params, parts.embeddings, parts.base_key)
  if len(devices) == 1:
    step = jax.jit(functools.partial(train.train_step, scene=parts.scene, guidance=parts.guidance,
                                     settings=parts.settings, tx=parts.tx, axis_name=None))
    return step, jax.device_put(args, devices[0])
  step = train.make_pmapped_step(parts.scene, parts.guidance, parts.settings, parts.tx, devices=devices)
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
  from dreamfusion_jax.guidance import stable_diffusion as sd  # pylint: disable=g-import-not-at-top

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
  from dreamfusion_jax.guidance import stable_diffusion as sd  # pylint: disable=g-import-not-at-top

  guidance = parts.guidance
  b, n = parts.settings.batch_size, guidance.latent_size
  noisy = jax.random.normal(jax.random.PRNGKey(6), (b, n, n, guidance.latent_channels))
  t = jnp.full((b,), guidance.num_train_timesteps // 2, jnp.int32)
  cond, uncond = prompts_lib.select_embeddings(parts.embeddings, jnp.zeros((b,), jnp.int32))

  def unet_params_only(gparams):  # the VAE and text weights need not travel
    return {"unet": gparams["unet"], "alphas_cumprod": gparams["alphas_cumprod"]}

  fn = jax.jit(lambda p, z, t, c, u: sd.guided_noise(guidance, p, z, t, c, u))
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


# ----------------------------------------------------------------------------- tables


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table: columns as wide as their widest cell, numbers right-aligned,
  text left-aligned, a rule under the header."""
  cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
  numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(header))]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

  def line(r):
    return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

  return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _is_number(v) -> bool:
  return v is None or isinstance(v, (int, float, np.number)) or (isinstance(v, str) and v in ("n/a", "-"))


def _cell(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
  return str(v)


def _ms(seconds: Optional[float]) -> Optional[float]:
  return None if seconds is None else round(seconds * 1e3, 2)


def _mib(num_bytes: Optional[int]) -> Optional[float]:
  return None if num_bytes is None else round(num_bytes / 2**20, 2)


def component_table(results: dict[str, Measurement], peaks: dict[str, float],
                    reference_s: Optional[dict[str, tuple[float, float]]] = None) -> str:
  """The main table: per component median/min time, GFLOP, GFLOP/s, MFU, compile time,
  temp memory, and (with a reference) its median time and the JAX/reference ratios of
  the medians and of the minima (the minima resist a busy machine better).

  Args:
    results: name -> Measurement.
    peaks: dtype name -> peak FLOP/s (the matmul peak).
    reference_s: name -> (median, min) seconds of the PyTorch reference.
  """
  header = ["component", "median ms", "min ms", "GFLOP", "GFLOP/s", "MFU %", "compile s", "temp MiB"]
  if reference_s is not None:
    header += ["torch ms", "jax/torch", "(min)"]
  rows = []
  for name, m in results.items():
    mfu = m.mfu(peaks.get(m.dtype))
    row = [DESCRIPTIONS.get(name, name), _ms(m.median_s), _ms(m.min_s),
           None if m.flops is None else round(m.flops / 1e9, 3),
           None if m.flops_per_s is None else round(m.flops_per_s / 1e9, 2),
           None if mfu is None else round(100 * mfu, 1),
           None if m.compile_s is None else round(m.compile_s, 1), _mib(m.temp_bytes)]
    if reference_s is not None:
      ref = reference_s.get(name)
      row += [None, None, None] if ref is None else [_ms(ref[0]), round(m.median_s / ref[0], 2),
                                                     round(m.min_s / ref[1], 2)]
    rows.append(row)
  return format_table(header, rows)


def scaling_table(rows: Sequence[dict]) -> str:
  """Step time per render setting, with the growth relative to the first row (the
  config's own settings)."""
  if not rows:
    return ""
  first = rows[0]["median_s"]
  body = [[f"{r['height']}x{r['width']}", r["num_samples"], r["points"], _ms(r["median_s"]),
           round(r["median_s"] / first, 2), None if r["flops"] is None else round(r["flops"] / 1e9, 3),
           round(r["compile_s"], 1)] for r in rows]
  return format_table(["render", "samples", "points", "step ms", "x config", "GFLOP", "compile s"], body)


# ----------------------------------------------------------------------------- SD-2.1-base shapes

# stabilityai/stable-diffusion-2-1-base, from its unet/, vae/ and text_encoder/ config.json.
SD21_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD21_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD21_TEXT_ENCODER_CONFIG = {  # OpenCLIP ViT-H/14's text tower minus its last layer
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}


def random_params(shapes, seed: int, dtype=jnp.float32, device: Optional[jax.Device] = None):
  """Random weights for a param-shape tree with tiny.random_params' scales (fan-in-scaled
  kernels, norm scales near 1, small biases), so activations stay O(1) and timings
  see ordinary numbers, not NaNs or denormals.

  Drawn leaf by leaf with numpy and put on `device` at once: seconds for SD's 1.3 B
  weights, and the host never holds more than one leaf (a jax.random draw would
  compile a program per leaf shape, or hold every weight twice).
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  device = device or jax.local_devices()[0]
  out = {}
  for path, leaf in sorted(traverse_util.flatten_dict(dict(shapes)).items()):
    shape = tuple(leaf.shape)
    z = rng.standard_normal(shape, dtype=np.float32)
    if path[-1] == "kernel":
      z *= 1.0 / math.sqrt(max(1, int(np.prod(shape[:-1]))))
    elif path[-1] == "scale":
      z = 1.0 + 0.1 * z
    elif path[-1] == "embedding":
      z *= 0.5
    else:
      z *= 0.1
    out[path] = jax.device_put(z.astype(dtype), device)
  return traverse_util.unflatten_dict(out)


def sd21_shaped_guidance(settings, *, dtype: str = "float32", seed: int = 0):
  """A StableDiffusionGuidance with SD-2.1-base's shapes and random weights: benchmark
  an accelerator at full size with nothing downloaded. The tokenizer is the tiny
  byte-level one (ids fit the 49408-token vocabulary; the cost does not depend on them).

  Returns:
    (guidance, params) as `load_stable_diffusion` returns them.
  """
  from dreamfusion_jax.guidance import sds, tiny  # pylint: disable=g-import-not-at-top
  from dreamfusion_jax.guidance import stable_diffusion as sd  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top

  if settings.image_size % 64:
    raise ValueError(f"SD-2.1-base shapes need image_size a multiple of 64 (VAE x UNet downsampling); "
                     f"got {settings.image_size}")
  jdtype = sd.DTYPES[dtype]
  unet, unet_shapes = sd.unet_from_config(SD21_UNET_CONFIG, jdtype)
  vae, vae_shapes = sd.vae_from_config(SD21_VAE_CONFIG, jdtype)
  text_encoder, text_shapes = sd.text_encoder_from_config(SD21_TEXT_ENCODER_CONFIG, jdtype)
  with tempfile.TemporaryDirectory() as d:
    tiny.write_tokenizer(pathlib.Path(d))
    tokenizer = CLIPTokenizer.from_pretrained(d, local_files_only=True)
  sched = tiny.TINY_SCHEDULER_CONFIG  # SD's scaled-linear DDPM schedule, as SD-2.1-base
  alphas_cumprod = sds.ddpm_alphas_cumprod(beta_start=sched["beta_start"], beta_end=sched["beta_end"],
                                           beta_schedule=sched["beta_schedule"],
                                           num_train_timesteps=sched["num_train_timesteps"])
  params = {"unet": random_params(unet_shapes, seed, jdtype), "vae": random_params(vae_shapes, seed + 1, jdtype),
            "text_encoder": random_params(text_shapes, seed + 2, jdtype), "alphas_cumprod": jnp.asarray(alphas_cumprod)}
  guidance = sd.StableDiffusionGuidance(
      model="SD-2.1-base shapes, random weights", unet=unet, vae=vae, text_encoder=text_encoder,
      tokenizer=tokenizer, settings=settings, dtype=jdtype, num_train_timesteps=len(alphas_cumprod),
      prediction_type="epsilon", vae_scaling_factor=SD21_VAE_CONFIG["scaling_factor"], vae_downsample=8,
      latent_channels=4)
  return guidance, params


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
  from dreamfusion_jax.guidance import stable_diffusion as sd  # pylint: disable=g-import-not-at-top

  jdtype = sd.DTYPES[dtype]
  b, n = batch_size, image_size // 8
  unet, unet_shapes = sd.unet_from_config(SD21_UNET_CONFIG, jdtype)
  vae, vae_shapes = sd.vae_from_config(SD21_VAE_CONFIG, jdtype)
  text_encoder, text_shapes = sd.text_encoder_from_config(SD21_TEXT_ENCODER_CONFIG, jdtype)
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


def flop_model_table(flops: dict[str, Optional[float]], *, peak_tflops: float = 989.0,
                     mfus: Sequence[float] = (1.0, 0.4)) -> str:
  """The FLOP model as a table, plus the time per iteration at `peak_tflops` (H100 SXM
  dense bfloat16 by default) for each MFU in `mfus`. The text encoder runs once per
  run and is not part of an iteration."""
  per_iteration = sum(v for k, v in flops.items() if k != "text_encoder" and v is not None)
  rows = [[DESCRIPTIONS.get(k, k), None if v is None else round(v / 1e12, 3)] for k, v in flops.items()]
  rows.append(["per iteration (without the text encoder)", round(per_iteration / 1e12, 3)])
  lines = [format_table(["part", "TFLOP"], rows), ""]
  for mfu in mfus:
    ms = per_iteration / (peak_tflops * 1e12 * mfu) * 1e3
    lines.append(f"at {peak_tflops:g} TFLOP/s and {100 * mfu:g} % MFU: {ms:.1f} ms per iteration")
  return "\n".join(lines)


def render_flops(config: ml_collections.ConfigDict) -> Optional[float]:
  """FLOPs of the render forward+backward of one device's batch (lowered, not run)."""
  scene = scene_lib.build_scene(config)
  settings = train.StepSettings.from_config(config, num_devices=1)
  params = jax.eval_shape(scene.init, jax.random.PRNGKey(0))
  parts = StepParts(config=config, guidance=None, guidance_params=None, embeddings=None, scene=scene, tx=None,
                    settings=settings, state=state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                              opt_state=None, num_skipped=None),
                    base_key=jax.random.PRNGKey(0))
  fn, args = render_fwd_bwd_fn(parts)
  return cost_flops(fn.lower(*args))


# ----------------------------------------------------------------------------- the whole run


def run_benchmark(
    config: ml_collections.ConfigDict,
    *,
    model: Optional[str] = None,
    repeats: int = 20,
    scaling: bool = False,
    scaling_repeats: int = 3,
    bf16: bool = False,
    remat: bool = False,
    sd21_shapes: bool = False,
    reference_factory: Optional[Callable[..., Any]] = None,
    workdir: Optional[str] = None,
    metadata: Optional[dict] = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
  """Measures the step, its parts, the matmul peak, optionally the PyTorch reference and
  the scaling sweep. Returns a JSON-serialisable dict (see `report` for the tables).

  Args:
    config: the experiment config (e.g. configs/dreamfusion.py:tiny); not modified.
    model: a diffusers-layout directory, or None / "tiny" for a tiny random Stable
      Diffusion written (PyTorch safetensors, readable by both sides) under `workdir`.
    bf16: guidance weights and activations in bfloat16 (config.guidance.dtype).
    remat: jax.checkpoint around the render in the render row; the full step too
      when the config has `render.remat` (see docs/performance.md).
    sd21_shapes: SD-2.1-base-shaped UNet/VAE/CLIP with random weights instead of a
      model directory (needs a config with guidance.image_size a multiple of 64).
    reference_factory: called as f(config, model_dir or None, scene_params,
      configs=...) -> an object with `time_components(repeats, log=...)` returning
      name -> seconds per call (benchmarks/torch_reference.TorchReference).
    workdir: where the tiny model is written (default: a temporary directory).
    metadata: extra entries for the result (the script records XLA_FLAGS and the
      machine's load average).
  """
  from dreamfusion_jax.guidance import stable_diffusion as sd  # pylint: disable=g-import-not-at-top
  from dreamfusion_jax.guidance import tiny  # pylint: disable=g-import-not-at-top

  config = copy.deepcopy(config)
  notes = []
  if bf16:
    config.guidance.dtype = "bfloat16"
  if remat:
    if "remat" in config.render:
      config.render.remat = True
    else:
      notes.append("remat: only the render row is rematerialised (jax.checkpoint in the benchmark); the full step "
                   "needs config.render.remat (docs/performance.md)")
  train.validate_config(config)
  devices = jax.local_devices()
  tmp = None
  model_dir = None
  if sd21_shapes:
    if config.guidance.image_size % 64:
      raise train.ConfigError(f"--sd21_shapes needs config.guidance.image_size a multiple of 64 (VAE x UNet "
                              f"downsampling), got {config.guidance.image_size}: use "
                              "--config=configs/dreamfusion.py (512)")
    log("building SD-2.1-base-shaped models with random weights")
    guidance_and_params = sd21_shaped_guidance(sd.settings_from_config(config.guidance), dtype=config.guidance.dtype)
    model_desc = guidance_and_params[0].model
  else:
    if model in (None, "", "tiny"):
      tmp = tempfile.TemporaryDirectory() if workdir is None else None
      model_dir = str(tiny.build_tiny_pipeline_dir(pathlib.Path(workdir or tmp.name) / "tiny_sd", fmt="safetensors"))
      model_desc = "tiny random Stable Diffusion (guidance/tiny.py)"
    else:
      model_dir = model_desc = model
    config.guidance.model = model_dir
    log(f"loading {model_dir}")
    guidance_and_params = sd.from_config(config.guidance)

  parts = build_step_parts(config, guidance_and_params=guidance_and_params, num_devices=len(devices))
  scene_params = jax.device_get(parts.state.params)  # before any donation
  log("matmul peak")
  peaks = {"float32": matmul_peak(dtype=jnp.float32, device=devices[0])}
  if config.guidance.dtype == "bfloat16":
    peaks["bfloat16"] = matmul_peak(dtype=jnp.bfloat16, device=devices[0])
  # The best of the runs: a peak is what the device can do, and other processes only slow it.
  peak_rates = {k: m.flops / m.min_s for k, m in peaks.items()}
  results = measure_components(parts, repeats=repeats, remat=remat, devices=devices, log=log)
  out = {
      "device": f"{devices[0].platform}: {devices[0].device_kind} x{len(devices)}",
      "jax_version": jax.__version__,
      "model": model_desc,
      "settings": {"height": config.render.height, "width": config.render.width,
                   "num_samples": config.render.num_samples, "batch_size": config.train.batch_size,
                   "num_devices": len(devices), "image_size": config.guidance.image_size,
                   "guidance_dtype": config.guidance.dtype, "remat": remat, "repeats": repeats},
      "peak_flops_per_s": peak_rates,
      "peak_matmul": {k: m.to_json() for k, m in peaks.items()},
      "components": {k: m.to_json(peak_rates.get(m.dtype)) for k, m in results.items()},
      "device_peak_bytes": device_peak_bytes(devices[0]),
      "notes": notes,
      **(metadata or {}),
  }
  if reference_factory is not None:
    log("PyTorch reference")
    configs = None
    if sd21_shapes:
      configs = {"unet": SD21_UNET_CONFIG, "vae": SD21_VAE_CONFIG, "text_encoder": SD21_TEXT_ENCODER_CONFIG}
    reference = reference_factory(config, model_dir, scene_params, configs=configs)
    out["reference_threads"] = getattr(reference, "num_threads", None)
    times = reference.time_components(repeats, log=log)
    out["reference"] = {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": list(t)}
                        for name, t in times.items()}
    out["ratio_jax_over_reference"] = {name: results[name].median_s / out["reference"][name]["median_s"]
                                       for name in results if name in out["reference"]}
  if scaling:
    out["scaling"] = measure_scaling(parts, repeats=scaling_repeats, log=log)
  if tmp is not None:
    tmp.cleanup()
  return out


def report(result: dict) -> str:
  """The printed summary of a `run_benchmark` result: settings, the component table
  (with the reference columns when present), the peaks, the scaling table."""
  s = result["settings"]
  lines = [f"device: {result['device']}   jax {result['jax_version']}",
           f"model: {result['model']}",
           f"render {s['height']}x{s['width']}, {s['num_samples']} samples/ray, batch {s['batch_size']} per device "
           f"x {s['num_devices']} devices, guidance image {s['image_size']}, {s['guidance_dtype']}, "
           f"remat {s['remat']}; median of {s['repeats']} runs", ""]
  results = {name: Measurement(name=name, times_s=tuple(m["times_s"]), compile_s=m["compile_s"], flops=m["flops"],
                               temp_bytes=m["temp_bytes"], dtype=m["dtype"])
             for name, m in result["components"].items()}
  reference = result.get("reference")
  lines.append(component_table(results, result["peak_flops_per_s"], None if reference is None else
                               {k: (v["median_s"], v["min_s"]) for k, v in reference.items()}))
  peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in result["peak_flops_per_s"].items())
  lines += ["", f"matmul peak (2048^3 jnp.dot on this device): {peaks}; MFU % is against it"]
  peak_mem = result["device_peak_bytes"]
  lines.append("device peak memory: " + ("n/a (the backend reports none)" if peak_mem is None
                                         else f"{peak_mem / 2**20:.1f} MiB"))
  if reference is not None:
    ratio = result["ratio_jax_over_reference"].get("train_step")
    lines.append(f"train step JAX/PyTorch: {ratio:.2f} (medians; < 1: JAX faster), torch threads "
                 f"{result.get('reference_threads')}")
  for note in result["notes"]:
    lines.append(f"note: {note}")
  if result.get("scaling"):
    lines += ["", "train step vs render size and samples per ray:", scaling_table(result["scaling"])]
  return "\n".join(lines)
