"""The DreamFusion SDS step in plain PyTorch: the reference the JAX benchmark compares with.

Same work as `dreamfusion_jax.train.train_step` on the same inputs:

  * a NeRF renderer written with torch ops: the hash grid as one gather plus trilinear
    weights (dense or hashed levels, instant-ngp primes), the field MLP, density blob,
    analytic normals by `torch.autograd.grad(create_graph=True)`, stratified bins,
    alpha compositing, DreamFusion shading, background MLP, orientation loss
    (the math of `render.py`, `encoding.py`, `fields.py`, `losses.py`);
  * diffusers' PyTorch `AutoencoderKL` / `UNet2DConditionModel` and transformers'
    `CLIPTextModel` loaded with `from_pretrained` from the same diffusers-layout
    directory (PyTorch-layout safetensors, e.g. `tiny.build_tiny_pipeline_dir(...,
    fmt="safetensors")`), so the weights are the ones JAX loads;
  * the NeRF weights converted from our Flax params (`params["field"]`,
    `params["background"]`), and Adam with the same per-group learning rates.

Randomness uses torch's generator: the same distributions, not the same draws.
torch is imported by this module only; the JAX package never imports it.

    ref = TorchReference(config, model_dir, jax_scene_params, num_threads=2)
    times = ref.time_components(repeats=20)   # name -> list of seconds
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dreamfusion_jax import encoding as encoding_lib
from dreamfusion_jax import scene as scene_lib

ALBEDO, LAMBERTIAN, TEXTURELESS = range(3)
FRONT, SIDE, BACK, OVERHEAD = range(4)

# ----------------------------------------------------------------------------- field


def _tensor(x, requires_grad: bool = False) -> torch.Tensor:
  return torch.tensor(np.asarray(x, np.float32), requires_grad=requires_grad)


def positional_encoding(x: torch.Tensor, num_frequencies: int) -> torch.Tensor:
  """[x, sin(2^k pi x), cos(2^k pi x) for k < K], interleaved per frequency (encoding.py)."""
  freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=x.dtype)
  angles = x[..., None, :] * freqs[:, None]  # (..., K, D)
  terms = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-2).reshape(*x.shape[:-1], -1)
  return torch.cat([x, terms], dim=-1)


def hash_grid_encode(x: torch.Tensor, tables: torch.Tensor, config: encoding_lib.HashGridConfig,
                     level_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
  """instant-ngp's multiresolution hash encoding of points x (P, 3) in [0, 1]^3.

  tables: (L, 2^T, F). Returns (P, L * F), level-major. Vertex-aligned grid, dense
  indexing where (N_l + 1)^3 <= 2^T, else the XOR hash with instant-ngp's primes.
  """
  num_levels, table_size = config.num_levels, config.table_size
  x = torch.where(x < 0.0, torch.zeros_like(x), torch.where(x > 1.0, torch.ones_like(x), x))
  res_int = torch.tensor(config.level_resolutions(), dtype=torch.int64)
  res = res_int.to(x.dtype)[:, None]  # (L, 1)
  scaled = x[:, None, :] * res  # (P, L, 3)
  cell = torch.minimum(torch.clamp(torch.floor(scaled), min=0.0), res - 1.0)
  frac = scaled - cell
  offsets = torch.tensor([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=torch.int64)
  corners = cell.to(torch.int64)[:, :, None, :] + offsets  # (P, L, 8, 3)
  upper = offsets.to(torch.bool)
  weights = torch.where(upper, frac[:, :, None, :], 1.0 - frac[:, :, None, :]).prod(dim=-1)  # (P, L, 8)
  stride = (res_int + 1)[:, None]
  dense_rows = corners[..., 0] + stride * (corners[..., 1] + stride * corners[..., 2])
  # The 32-bit products of the CUDA hash, kept in int64: only the low T bits survive.
  h = corners * torch.tensor(encoding_lib.HASH_PRIMES, dtype=torch.int64)
  hashed_rows = h[..., 0] ^ h[..., 1] ^ h[..., 2]
  dense = torch.tensor(config.dense_levels())[:, None]
  rows = torch.where(dense, dense_rows, hashed_rows) & (table_size - 1)
  rows = rows + torch.arange(num_levels, dtype=torch.int64)[:, None] * table_size
  corner_features = tables.reshape(num_levels * table_size, -1)[rows]  # (P, L, 8, F)
  features = (weights[..., None] * corner_features).sum(dim=-2)  # (P, L, F)
  if level_mask is not None:
    features = features * level_mask[:, None]
  return features.reshape(x.shape[0], -1)


def _mlp(h: torch.Tensor, layers) -> torch.Tensor:
  """Dense layers (kernel (in, out) as in Flax) with ReLU between them."""
  for kernel, bias in layers[:-1]:
    h = torch.relu(h @ kernel + bias)
  kernel, bias = layers[-1]
  return h @ kernel + bias


class TorchField(torch.nn.Module):
  """`fields.NeRFField` with its Flax parameters as torch Parameters."""

  def __init__(self, definition, params: Mapping[str, Any]):
    super().__init__()
    self.definition = definition
    if definition.encoding == "hashgrid":
      self.tables = torch.nn.Parameter(_tensor(params["hash_grid"]["tables"]))
    names = [f"hidden_{i}" for i in range(definition.num_layers)] + ["output"]
    self.kernels = torch.nn.ParameterList([torch.nn.Parameter(_tensor(params[n]["kernel"])) for n in names])
    self.biases = torch.nn.ParameterList([torch.nn.Parameter(_tensor(params[n]["bias"])) for n in names])

  def forward(self, positions: torch.Tensor, level_mask: Optional[torch.Tensor] = None):
    """positions (..., 3) world units -> density (...,), albedo (..., 3)."""
    d = self.definition
    flat = positions.reshape(-1, 3)
    if d.encoding == "hashgrid":
      h = hash_grid_encode((flat / d.bound + 1.0) * 0.5, self.tables, d.hash_grid, level_mask)
    else:
      h = positional_encoding(flat / d.bound, d.num_frequencies)
    out = _mlp(h, list(zip(self.kernels, self.biases)))
    sq = (flat**2).sum(dim=-1)
    if d.blob_kind == "magic3d":
      blob = d.blob_strength * (1.0 - torch.sqrt(sq + 1e-12) / d.blob_radius)
    elif d.blob_kind == "dreamfusion":
      blob = d.blob_strength * torch.exp(-0.5 * sq / d.blob_radius**2)
    else:
      blob = torch.zeros_like(sq)
    raw = out[:, 0] + blob
    density = F.softplus(raw) if d.density_activation == "softplus" else torch.exp(torch.clamp(raw, max=15.0))
    albedo = torch.sigmoid(out[:, 1:])
    return density.reshape(positions.shape[:-1]), albedo.reshape(positions.shape)


class TorchBackground(torch.nn.Module):
  """`fields.BackgroundMLP`: PE(direction) -> ReLU MLP -> sigmoid colour."""

  def __init__(self, definition, params: Mapping[str, Any]):
    super().__init__()
    self.definition = definition
    names = [f"hidden_{i}" for i in range(definition.num_layers)] + ["output"]
    self.kernels = torch.nn.ParameterList([torch.nn.Parameter(_tensor(params[n]["kernel"])) for n in names])
    self.biases = torch.nn.ParameterList([torch.nn.Parameter(_tensor(params[n]["bias"])) for n in names])

  def forward(self, directions: torch.Tensor) -> torch.Tensor:
    h = positional_encoding(directions, self.definition.num_frequencies)
    return torch.sigmoid(_mlp(h, list(zip(self.kernels, self.biases))))


# ----------------------------------------------------------------------------- rendering


def intersect_sphere(origins, directions, radius: float):
  b = (origins * directions).sum(-1)
  c = (origins * origins).sum(-1) - radius**2
  disc = b * b - c
  sqrt_disc = torch.sqrt(torch.clamp(disc, min=0.0))
  near = torch.clamp(-b - sqrt_disc, min=0.0)
  far = torch.maximum(-b + sqrt_disc, near)
  hit = disc > 0
  return torch.where(hit, near, torch.zeros_like(near)), torch.where(hit, far, torch.zeros_like(far))


def render_rays(field_fn: Callable, origins: torch.Tensor, directions: torch.Tensor, *, jitter: torch.Tensor,
                bound: float, normal_mode: str = "analytic", light_positions: torch.Tensor,
                shading: torch.Tensor, ambient: float = 0.1, diffuse: float = 0.9,
                background: torch.Tensor) -> dict:
  """`render.render_rays` without importance sampling, for N rays.

  Args:
    jitter: (N, S) position of each sample inside its bin, in [0, 1] (0.5: midpoints).
    light_positions: (N, 3). shading: (N,) int modes. background: (N, 3).

  Returns:
    dict of rgb (N, 3), opacity (N,), normals (N, 3), weights (N, S),
    sample_normals (N, S, 3).
  """
  num_samples = jitter.shape[-1]
  near, far = intersect_sphere(origins, directions, bound)
  edges = near[:, None] + (far - near)[:, None] * torch.linspace(0.0, 1.0, num_samples + 1)
  t = edges[:, :-1] + jitter * (edges[:, 1:] - edges[:, :-1])
  delta = edges[:, 1:] - edges[:, :-1]
  positions = origins[:, None, :] + t[..., None] * directions[:, None, :]
  if normal_mode == "analytic":
    positions = positions.detach().requires_grad_(True)
    with torch.enable_grad():
      density, albedo = field_fn(positions)
      # Pointwise field: the gradient of the sum is every point's own gradient.
      (grad,) = torch.autograd.grad(density.sum(), positions, create_graph=True)
  elif normal_mode == "finite_difference":
    density, albedo = field_fn(positions)
    eps = 1e-3
    grad = torch.stack([(field_fn(positions + eps * o)[0] - field_fn(positions - eps * o)[0]) / (2 * eps)
                        for o in torch.eye(3)], dim=-1)
  else:
    raise ValueError(f"normal_mode {normal_mode!r} is not in the reference")
  normals = -grad / torch.clamp(torch.linalg.norm(grad, dim=-1, keepdim=True), min=1e-12)
  tau = density * delta
  weights = torch.exp(-(torch.cumsum(tau, dim=-1) - tau)) * -torch.expm1(-tau)
  to_light = light_positions[:, None, :] - positions
  to_light = to_light / torch.clamp(torch.linalg.norm(to_light, dim=-1, keepdim=True), min=1e-12)
  lighting = ambient + diffuse * torch.clamp((normals * to_light).sum(-1, keepdim=True), min=0.0)
  mode = shading[:, None, None]
  colors = torch.where(mode == ALBEDO, albedo,
                       torch.where(mode == LAMBERTIAN, albedo * lighting, lighting.expand_as(albedo)))
  opacity = weights.sum(-1)
  rgb = (weights[..., None] * colors).sum(-2) + (1.0 - opacity)[:, None] * background
  return {"rgb": rgb, "opacity": opacity, "normals": (weights[..., None] * normals).sum(-2), "weights": weights,
          "sample_normals": normals}


def orientation_loss(weights, normals, directions):
  """DreamFusion's orientation loss, mean over rays (losses.orientation_loss)."""
  cos = (normals * directions[:, None, :]).sum(-1)
  return (weights.detach() * torch.clamp(cos, min=0.0) ** 2).sum(-1).mean()


# ----------------------------------------------------------------------------- cameras


def _normalize(v):
  return v / torch.clamp(torch.linalg.norm(v, dim=-1, keepdim=True), min=1e-12)


def look_at(eye, target, up):
  forward = _normalize(target - eye)
  right = _normalize(torch.linalg.cross(forward, up))
  return torch.stack([right, torch.linalg.cross(right, forward), -forward], dim=-1)


def generate_rays(positions, c2w, fovy_deg, height: int, width: int):
  """One ray per pixel centre (cameras.generate_rays): (B, H*W, 3) origins, directions."""
  i, j = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
  focal = (0.5 * height / torch.tan(0.5 * torch.deg2rad(fovy_deg)))[:, None, None]
  x = (j - 0.5 * width) / focal
  y = -(i - 0.5 * height) / focal
  dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1).reshape(len(fovy_deg), -1, 3)
  directions = _normalize(torch.einsum("bij,bnj->bni", c2w, dirs_cam))
  return positions[:, None, :].expand_as(directions), directions


# ----------------------------------------------------------------------------- the step


class TorchReference:
  """The SDS train step and its parts in PyTorch, for a config and a model directory.

  Args:
    config: the experiment config (configs/dreamfusion.py) the JAX side runs.
    model_dir: diffusers-layout directory with PyTorch safetensors, or None to build
      the models from `configs` with random weights (shape benchmarks).
    scene_params: the JAX scene params {"field", "background"} (numpy or jax arrays).
    num_threads: torch intra-op threads (match the cores JAX uses).
    configs: with model_dir None, {"unet", "vae", "text_encoder"} config dicts.
  """

  def __init__(self, config, model_dir: Optional[str], scene_params: Mapping[str, Any], *,
               num_threads: Optional[int] = None, configs: Optional[Mapping[str, Mapping]] = None, seed: int = 0):
    import diffusers  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    from dreamfusion_jax.guidance import diffusion  # pylint: disable=g-import-not-at-top
    from dreamfusion_jax.guidance.priors import stable_diffusion as sd  # pylint: disable=g-import-not-at-top

    self.num_threads = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(self.num_threads)
    self.gen = torch.Generator().manual_seed(seed)
    self.config = config
    g, r = config.guidance, config.render
    if r.num_importance_samples:
      raise NotImplementedError("the PyTorch reference renders without importance samples")
    self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[g.dtype]
    if model_dir is not None:
      root = pathlib.Path(model_dir)
      load = dict(low_cpu_mem_usage=False, torch_dtype=self.dtype)
      self.unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet", **load)
      self.vae = diffusers.AutoencoderKL.from_pretrained(root / "vae", **load)
      self.text_encoder = transformers.CLIPTextModel.from_pretrained(root / "text_encoder", dtype=self.dtype)
      scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
      self.tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    else:
      from dreamfusion_jax.guidance import tiny  # pylint: disable=g-import-not-at-top

      self.unet = diffusers.UNet2DConditionModel(**configs["unet"])
      self.vae = diffusers.AutoencoderKL(**configs["vae"])
      self.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"]))
      if self.dtype != torch.float32:
        for model in (self.unet, self.vae, self.text_encoder):
          model.to(self.dtype)
      scheduler = tiny.TINY_SCHEDULER_CONFIG
      with tempfile.TemporaryDirectory() as d:
        tiny.write_tokenizer(pathlib.Path(d))
        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(d)
    for model in (self.unet, self.vae, self.text_encoder):
      model.eval().requires_grad_(False)
    self.alphas_cumprod = torch.from_numpy(diffusion.ddpm_alphas_cumprod(
        beta_start=scheduler.get("beta_start", 0.0001), beta_end=scheduler.get("beta_end", 0.02),
        beta_schedule=scheduler.get("beta_schedule", "linear"),
        num_train_timesteps=scheduler.get("num_train_timesteps", 1000)))
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
      raise NotImplementedError("the PyTorch reference assumes an epsilon-prediction UNet")
    self.vae_scale = float(self.vae.config.get("scaling_factor", 0.18215))
    self.settings = sd.settings_from_config(g)

    scene = scene_lib.build_scene(config)
    self.scene = scene
    self.field = TorchField(scene.field, scene_params["field"])
    self.background = None if scene.background is None else TorchBackground(scene.background,
                                                                             scene_params["background"])
    o = config.optim
    groups = [{"params": list(self.field.parameters()), "lr": o.lr}]
    if self.background is not None:
      groups.append({"params": list(self.background.parameters()), "lr": o.background_lr})
    self.optimizer = torch.optim.Adam(groups, betas=(o.b1, o.b2), eps=o.eps)
    self.step_count = 0

    texts = [config.prompt + s for s in (", front view", ", side view", ", back view", ", overhead view")]
    if not g.view_dependent:
      texts = [config.prompt] * 4
    self.text_ids = self.tokenizer(texts + [g.negative_prompt], padding="max_length",
                                   max_length=min(self.tokenizer.model_max_length, 77), truncation=True,
                                   return_tensors="pt").input_ids
    emb = self.encode_text()
    self.cond_emb, self.uncond_emb = emb[:4], emb[4]

  # --------------------------------------------------------------------------- parts

  def encode_text(self) -> torch.Tensor:
    with torch.no_grad():
      return self.text_encoder(self.text_ids).last_hidden_state.float()

  def _uniform(self, shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(shape, generator=self.gen)

  def sample_views(self, batch_size: int) -> dict:
    """Cameras, lights, shading, backgrounds and jitter (train.sample_views)."""
    c, b = self.config.cameras, batch_size
    radius = self._uniform((b,), *c.radius_range)
    elevation = self._uniform((b,), *c.elevation_range_deg)
    u = torch.rand(b, generator=self.gen)
    if c.stratified_azimuth:  # camera i draws from the i-th of b equal slices
      u = (torch.arange(b) + u) / b
    lo, hi = c.azimuth_range_deg
    azimuth = (lo + u * (hi - lo) + 180.0) % 360.0 - 180.0
    fovy = self._uniform((b,), *c.fovy_range_deg)
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    positions = torch.stack([radius * torch.cos(el) * torch.cos(az), radius * torch.cos(el) * torch.sin(az),
                             radius * torch.sin(el)], dim=-1)
    positions = positions + c.camera_perturb * torch.randn(b, 3, generator=self.gen)
    center = c.center_perturb * torch.randn(b, 3, generator=self.gen)
    up = torch.tensor([0.0, 0.0, 1.0]) + c.up_perturb * torch.randn(b, 3, generator=self.gen)
    c2w = look_at(positions, center, up)
    direction = _normalize(positions + c.light_perturb * torch.randn(b, 3, generator=self.gen))
    lights = direction * self._uniform((b, 1), *c.light_distance_range)
    probs = torch.tensor(self.config.render.shading_probs, dtype=torch.float32)
    shading = torch.multinomial(probs / probs.sum(), b, replacement=True, generator=self.gen)
    if self.step_count < self.config.render.albedo_warmup_steps:
      shading = torch.zeros_like(shading)
    bg = self.config.background
    if bg.kind == "fixed":
      solid, use_solid = torch.tensor(bg.color, dtype=torch.float32).expand(b, 3), torch.ones(b, dtype=torch.bool)
    else:
      solid = torch.rand(b, 3, generator=self.gen)
      use_solid = torch.rand(b, generator=self.gen) < (1.0 if bg.kind == "random" else bg.random_prob)
    az_w = (azimuth + 180.0) % 360.0 - 180.0
    bucket = torch.full((b,), SIDE)
    bucket = torch.where(az_w.abs() <= c.front_threshold_deg, FRONT, bucket)
    bucket = torch.where((az_w % 360.0 - 180.0).abs() <= c.back_threshold_deg, BACK, bucket)  # |wrap(az - 180)|
    bucket = torch.where(elevation > c.overhead_threshold_deg, OVERHEAD, bucket)
    return {"positions": positions, "c2w": c2w, "fovy": fovy, "lights": lights, "shading": shading,
            "solid": solid, "use_solid": use_solid, "bucket": bucket}

  def level_mask(self) -> Optional[torch.Tensor]:
    f = self.config.field
    if f.encoding != "hashgrid" or f.progressive_start_levels >= f.num_levels:
      return None
    waited = max(self.step_count - f.progressive_start_step, 0)
    active = f.progressive_start_levels + waited // f.progressive_update_every
    return (torch.arange(f.num_levels) < active).float()

  def render(self, views: dict) -> dict:
    """Renders the batch: rgb (B, H, W, 3) and the mean orientation loss."""
    r = self.config.render
    h, w = r.height, r.width
    origins, directions = generate_rays(views["positions"], views["c2w"], views["fovy"], h, w)
    b, n = origins.shape[:2]
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    solid = views["solid"][:, None, :].expand(b, n, 3).reshape(-1, 3)
    if self.background is None:
      background = solid
    else:
      use = views["use_solid"][:, None, None].expand(b, n, 1).reshape(-1, 1)
      background = torch.where(use, solid, self.background(directions))
    mask = self.level_mask()
    out = render_rays(lambda x: self.field(x, mask), origins, directions,
                      jitter=torch.rand(b * n, r.num_samples, generator=self.gen), bound=r.bound,
                      normal_mode=r.normal_mode, light_positions=views["lights"][:, None].expand(b, n, 3).reshape(-1, 3),
                      shading=views["shading"][:, None].expand(b, n).reshape(-1), ambient=r.ambient, diffuse=r.diffuse,
                      background=background)
    per_image = lambda x: x.reshape(b, n, *x.shape[1:])
    orientation = torch.stack([orientation_loss(wt, nm, d) for wt, nm, d in zip(
        per_image(out["weights"]), per_image(out["sample_normals"]), per_image(directions))]).mean()
    opacity = per_image(out["opacity"])
    return {"rgb": per_image(out["rgb"]).reshape(b, h, w, 3), "orientation": orientation, "opacity": opacity}

  def encode_images(self, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, C, h, w) scaled latents, differentiably."""
    size = self.settings.image_size
    x = images.permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
      x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    posterior = self.vae.encode((x * 2.0 - 1.0).to(self.dtype)).latent_dist
    latents = posterior.sample(generator=self.gen) if self.settings.sample_posterior else posterior.mean
    return latents.float() * self.vae_scale

  def guided_noise(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor):
    """eps_u + s (eps_c - eps_u) from one UNet call on the doubled batch."""
    b = noisy.shape[0]
    with torch.no_grad():
      eps = self.unet(torch.cat([noisy, noisy]).to(self.dtype), torch.cat([t, t]),
                      encoder_hidden_states=torch.cat([uncond, cond]).to(self.dtype)).sample.float()
    return eps[:b] + self.settings.guidance_scale * (eps[b:] - eps[:b])

  def sds_loss(self, images: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    s, g = self.settings, self.config.guidance
    latents = self.encode_images(images)
    b, steps = latents.shape[0], len(self.alphas_cumprod)
    frac = min(1.0, self.step_count / g.t_anneal_steps) if g.t_anneal_steps > 0 else 0.0
    t_max = g.t_max + (g.t_max_end - g.t_max) * frac
    lo, hi = round(g.t_min * steps), round(t_max * steps)
    t = torch.randint(lo, max(hi, lo) + 1, (b,), generator=self.gen)
    noise = torch.randn(latents.shape, generator=self.gen)
    abar = self.alphas_cumprod[t][:, None, None, None]
    noisy = (abar.sqrt() * latents + (1.0 - abar).sqrt() * noise).detach()
    eps_hat = self.guided_noise(noisy, t, cond, uncond)
    weight = {"sds": 1.0 - abar, "uniform": torch.ones_like(abar), "fantasia3d": abar.sqrt() * (1.0 - abar)}[s.weighting]
    grad = torch.nan_to_num(weight * (eps_hat - noise), nan=0.0, posinf=0.0, neginf=0.0)
    if s.grad_clip:
      grad = grad.clamp(-s.grad_clip, s.grad_clip)
    return 0.5 * ((latents - (latents - grad).detach()) ** 2).sum() / b

  def _weight(self, name: str) -> float:
    """losses.ramped_weight: the regularizer weight, ramped linearly over its warmup."""
    weight, warmup = self.config.loss[f"{name}_weight"], self.config.loss[f"{name}_warmup_steps"]
    return weight * min(1.0, self.step_count / warmup) if warmup > 0 else weight

  def train_step(self) -> dict:
    """One SDS step: render, VAE encode, CFG UNet, surrogate loss, backward, Adam."""
    views = self.sample_views(self.config.train.batch_size)
    out = self.render(views)
    cond = self.cond_emb[views["bucket"]]
    uncond = self.uncond_emb.expand_as(cond)
    loss = self.sds_loss(out["rgb"], cond, uncond) + self._weight("orientation") * out["orientation"]
    if self.config.loss.opacity_weight:
      loss = loss + self._weight("opacity") * torch.sqrt(out["opacity"] ** 2 + 0.01).mean()
    if self.config.loss.entropy_weight:
      o = out["opacity"].clamp(1e-5, 1 - 1e-5)
      loss = loss + self._weight("entropy") * (-o * torch.log(o) - (1 - o) * torch.log(1 - o)).mean()
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in self.optimizer.param_groups for p in group["params"]]
    if self.config.optim.grad_clip > 0:
      grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
    else:
      grad_norm = torch.linalg.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
    if finite:  # a non-finite step is skipped, as in train_step
      self.optimizer.step()
    self.step_count += 1
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "skipped": not finite}

  # --------------------------------------------------------------------------- timing

  def component_fns(self) -> dict[str, Callable[[], Any]]:
    """Zero-argument callables doing the same work as the JAX benchmark's components."""
    r, b = self.config.render, self.config.train.batch_size
    views = self.sample_views(b)
    cot = torch.rand(b, r.height, r.width, 3, generator=self.gen)
    images = torch.rand(b, r.height, r.width, 3, generator=self.gen)
    n = self.settings.image_size // (2 ** (len(self.vae.config.block_out_channels) - 1))
    latent_cot = torch.randn(b, self.vae.config.latent_channels, n, n, generator=self.gen)
    noisy = torch.randn(b, self.unet.config.in_channels, n, n, generator=self.gen)
    t = torch.full((b,), len(self.alphas_cumprod) // 2)
    cond, uncond = self.cond_emb[:1].expand(b, -1, -1), self.uncond_emb.expand(b, -1, -1)
    params = list(self.field.parameters()) + ([] if self.background is None else list(self.background.parameters()))
    w_orient = self.config.loss.orientation_weight

    def render_fwd_bwd():
      out = self.render(views)
      return torch.autograd.grad((out["rgb"] * cot).sum() + w_orient * out["orientation"], params)

    def vae_fwd_bwd():
      x = images.clone().requires_grad_(True)
      return torch.autograd.grad(self.encode_images(x), x, grad_outputs=latent_cot)

    return {"train_step": self.train_step, "render_fwd_bwd": render_fwd_bwd, "vae_encode_fwd_bwd": vae_fwd_bwd,
            "unet_cfg_fwd": lambda: self.guided_noise(noisy, t, cond, uncond), "text_encoder": self.encode_text}

  def time_components(self, repeats: int, warmup: int = 2, log: Callable[[str], None] = lambda _: None
                      ) -> dict[str, list[float]]:
    """Seconds per call of each component (CPU ops are synchronous; no sync needed)."""
    times = {}
    for name, fn in self.component_fns().items():
      log(f"torch: {name}")
      n = max(3, repeats // 4) if name == "text_encoder" else repeats
      times[name] = []
      for i in range(warmup + n):
        start = time.perf_counter()
        fn()
        if i >= warmup:
          times[name].append(time.perf_counter() - start)
    return times
