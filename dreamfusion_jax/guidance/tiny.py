"""A tiny random Stable Diffusion in the diffusers layout, for tests and benchmarks.

No network and no torch: the configs below describe a UNet, VAE and CLIP text
encoder of a few hundred kilobytes; their weights are random, written either as
native Flax msgpack or as PyTorch-layout safetensors (through the inverse of the
loader's weight mapping). The directory loads through the real loading path:

    path = build_tiny_pipeline_dir(tmp_dir, fmt="safetensors")
    guidance, params = load_stable_diffusion(str(path), settings=SDSSettings(image_size=TINY_IMAGE_SIZE))

Design constraints:
  * diffusers' Flax UNet hard-codes GroupNorm(32), while its PyTorch UNet honours
    norm_num_groups: the UNet channels are multiples of 32 with norm_num_groups=32
    so both agree (the parity tests compare them).
  * The weights are filled from the modules' `jax.eval_shape` param trees with
    numpy, skipping the ~20 s compile of a Flax init on a small CPU.
  * The tokenizer is a real CLIP BPE tokenizer over the 256 byte symbols, without
    merges: every prompt tokenizes (one token per character), different prompts
    give different ids.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import flax.serialization
import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from dreamfusion_jax.guidance import stable_diffusion
from dreamfusion_jax.guidance import weight_conversion

TINY_IMAGE_SIZE = 32  # VAE input size; latents are TINY_IMAGE_SIZE / 2 = 16 pixels wide
TINY_MAX_LENGTH = 77  # tokens per prompt, as in Stable Diffusion

TINY_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,  # diffusers reads it as the number of heads
    "cross_attention_dim": 32,
    "use_linear_projection": True,  # as SD 2.x
    "norm_num_groups": 32,
}
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": TINY_IMAGE_SIZE,
    "scaling_factor": 0.18215,
}
TINY_SCHEDULER_CONFIG = {  # Stable Diffusion's DDPM schedule
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
  """GPT-2/CLIP's printable stand-ins for the 256 byte values, in byte order."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def tiny_vocab() -> dict[str, int]:
  """CLIP's vocabulary layout without merges: bytes, bytes + "</w>", then specials."""
  symbols = _bytes_to_unicode()
  tokens = symbols + [s + "</w>" for s in symbols] + [_BOS, _EOS]
  return {t: i for i, t in enumerate(tokens)}


def tiny_text_encoder_config() -> dict[str, Any]:
  vocab_size = len(tiny_vocab())
  return {
      "architectures": ["CLIPTextModel"],
      "model_type": "clip_text_model",
      "vocab_size": vocab_size,
      "hidden_size": 32,
      "intermediate_size": 37,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "max_position_embeddings": TINY_MAX_LENGTH,
      "hidden_act": "gelu",  # as SD 2.x's OpenCLIP-H text tower
      "layer_norm_eps": 1e-5,
      "projection_dim": 32,
      "bos_token_id": vocab_size - 2,
      "eos_token_id": vocab_size - 1,
      "pad_token_id": vocab_size - 1,
  }


def random_params(shapes: Mapping, seed: int) -> dict:
  """Random weights for a param-shape tree: fan-in-scaled kernels, norm scales near
  1, small biases and embeddings, so activations stay O(1) through the layers.

  Args:
    shapes: nested dict of leaves with `.shape` (jax.eval_shape of an init).

  Returns:
    Nested dict of float32 numpy arrays of those shapes.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in sorted(traverse_util.flatten_dict(dict(shapes)).items()):
    shape = tuple(leaf.shape)
    z = rng.standard_normal(shape).astype(np.float32)
    if path[-1] == "kernel":
      flat[path] = z / np.sqrt(np.prod(shape[:-1]))
    elif path[-1] == "scale":
      flat[path] = 1.0 + 0.1 * z
    elif path[-1] == "embedding":
      flat[path] = 0.5 * z
    else:
      flat[path] = 0.1 * z
    flat[path] = flat[path].astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def tiny_params(seed: int = 0) -> dict[str, dict]:
  """Random params {"unet", "vae", "text_encoder"} (numpy) for the tiny configs."""
  _, unet_shapes = stable_diffusion.unet_from_config(TINY_UNET_CONFIG)
  _, vae_shapes = stable_diffusion.vae_from_config(TINY_VAE_CONFIG)
  _, text_shapes = stable_diffusion.text_encoder_from_config(tiny_text_encoder_config())
  return {"unet": random_params(unet_shapes, seed), "vae": random_params(vae_shapes, seed + 1),
          "text_encoder": random_params(text_shapes, seed + 2)}


def _write_json(path: pathlib.Path, obj: Mapping) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_tokenizer(folder: pathlib.Path, max_length: int = TINY_MAX_LENGTH) -> None:
  """A CLIPTokenizer directory (vocab.json, merges.txt, configs) for tiny_vocab()."""
  folder.mkdir(parents=True, exist_ok=True)
  _write_json(folder / "vocab.json", tiny_vocab())
  (folder / "merges.txt").write_text("#version: 0.2\n")
  special = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
  _write_json(folder / "special_tokens_map.json", special)
  _write_json(folder / "tokenizer_config.json",
              {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **special})


def write_pipeline_dir(path: str | pathlib.Path, params: Mapping[str, Mapping], *, fmt: str = "flax",
                       unet_config: Mapping = TINY_UNET_CONFIG, vae_config: Mapping = TINY_VAE_CONFIG,
                       text_encoder_config: Mapping | None = None,
                       scheduler_config: Mapping = TINY_SCHEDULER_CONFIG,
                       max_length: int = TINY_MAX_LENGTH) -> pathlib.Path:
  """Writes params and configs in the diffusers layout.

  Args:
    path: the directory to create (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    params: {"unet", "vae", "text_encoder"} Flax param trees ("vae" unused when
      vae_config is None: a pixel-space model, whose model_index.json lists no VAE).
    fmt: "flax" (diffusion_flax_model.msgpack / flax_model.msgpack, as the Flax
      classes' save_pretrained writes them) or "safetensors" (PyTorch names and
      layouts: diffusion_pytorch_model.safetensors / model.safetensors).

  Returns:
    The directory.
  """
  if fmt not in ("flax", "safetensors"):
    raise ValueError(f"fmt={fmt!r}; known: 'flax', 'safetensors'")
  root = pathlib.Path(path)
  text_encoder_config = text_encoder_config or tiny_text_encoder_config()
  prefix = "Flax" if fmt == "flax" else ""
  components = {
      "unet": ({"_class_name": f"{prefix}UNet2DConditionModel", **unet_config}, "diffusion"),
      "text_encoder": (dict(text_encoder_config), "transformers"),
  }
  if vae_config is not None:
    components["vae"] = ({"_class_name": f"{prefix}AutoencoderKL", **vae_config}, "diffusion")
  for name, (config, library) in components.items():
    folder = root / name
    _write_json(folder / "config.json", config)
    tree = jax.tree.map(np.asarray, dict(params[name]))
    if fmt == "flax":
      file = "diffusion_flax_model.msgpack" if library == "diffusion" else "flax_model.msgpack"
      (folder / file).write_bytes(flax.serialization.to_bytes(tree))
    else:
      file = "diffusion_pytorch_model.safetensors" if library == "diffusion" else "model.safetensors"
      safetensors.numpy.save_file(weight_conversion.flax_to_pytorch(tree), str(folder / file),
                                  metadata={"format": "pt"})
  write_tokenizer(root / "tokenizer", max_length)
  _write_json(root / "scheduler" / "scheduler_config.json", scheduler_config)
  index = {
      "_class_name": f"{prefix}StableDiffusionPipeline",
      "unet": ["diffusers", f"{prefix}UNet2DConditionModel"],
      "vae": ["diffusers", f"{prefix}AutoencoderKL"],
      "text_encoder": ["transformers", f"{prefix}CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", f"{prefix}DDIMScheduler"],
  }
  if vae_config is None:
    del index["vae"]
  _write_json(root / "model_index.json", index)
  return root


def build_tiny_pipeline_dir(path: str | pathlib.Path, *, fmt: str = "flax", seed: int = 0) -> pathlib.Path:
  """A tiny random Stable Diffusion directory (see the module docstring); seconds to build."""
  return write_pipeline_dir(path, tiny_params(seed), fmt=fmt)
