"""The settings of the guidance (`config.guidance`): one frozen dataclass for the prior,
the distillation loss and the methods' values, validated where it is built.

Light on purpose (no model library): run-level code reads it without loading a prior.
"""

from __future__ import annotations

import dataclasses

from dreamfusion_jax.guidance import diffusion


@dataclasses.dataclass(frozen=True)
class SDSSettings:
  """Static settings of the SDS loss (changing one recompiles). See the module docstring."""

  guidance_scale: float = 100.0
  weighting: str = "sds"
  grad_clip: float | None = None
  image_size: int = 512
  sample_posterior: bool = False
  t_min: float = 0.02
  t_max: float = 0.98
  method: str = "sds"
  ism_delta_t: int = 50
  ism_inv_steps: int = 5
  vsd_lora_rank: int = 4
  vsd_lr: float = 1e-4

  def __post_init__(self):
    if self.ism_delta_t < 0 or self.ism_inv_steps < 1:
      raise ValueError(f"need guidance.ism_delta_t >= 0 and guidance.ism_inv_steps >= 1, got {self.ism_delta_t}, "
                       f"{self.ism_inv_steps}")
    if self.vsd_lora_rank < 1:
      raise ValueError(f"guidance.vsd_lora_rank={self.vsd_lora_rank} must be >= 1")
    if self.vsd_lr <= 0:
      raise ValueError(f"guidance.vsd_lr={self.vsd_lr} must be > 0")
    if self.weighting not in diffusion.WEIGHTINGS:
      raise ValueError(f"guidance.weighting={self.weighting!r}; known: {diffusion.WEIGHTINGS}")
    if not 0.0 <= self.t_min <= self.t_max <= 1.0:
      raise ValueError(f"need 0 <= guidance.t_min <= guidance.t_max <= 1, got {self.t_min}, {self.t_max}")
    if self.grad_clip is not None and self.grad_clip < 0:
      raise ValueError(f"guidance.grad_clip={self.grad_clip} must be >= 0 (0 or None: off)")
    if self.image_size <= 0:
      raise ValueError(f"guidance.image_size={self.image_size} must be positive")


def settings_from_config(cfg) -> SDSSettings:
  """SDSSettings from a `config.guidance` ConfigDict (missing fields: defaults)."""
  d = SDSSettings()
  grad_clip = cfg.get("grad_clip", d.grad_clip)
  return SDSSettings(
      guidance_scale=float(cfg.get("guidance_scale", d.guidance_scale)),
      weighting=cfg.get("weighting", d.weighting),
      grad_clip=float(grad_clip) if grad_clip else None,
      image_size=int(cfg.get("image_size", d.image_size)),
      sample_posterior=bool(cfg.get("sample_posterior", d.sample_posterior)),
      t_min=float(cfg.get("t_min", d.t_min)),
      t_max=float(cfg.get("t_max", d.t_max)),
      method=str(cfg.get("method", d.method)),
      ism_delta_t=int(cfg.get("ism_delta_t", d.ism_delta_t)),
      ism_inv_steps=int(cfg.get("ism_inv_steps", d.ism_inv_steps)),
      vsd_lora_rank=int(cfg.get("vsd_lora_rank", d.vsd_lora_rank)),
      vsd_lr=float(cfg.get("vsd_lr", d.vsd_lr)),
  )

