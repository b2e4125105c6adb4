"""Stable Diffusion's Flax modules built from their diffusers / transformers configs.

`unet_from_config`, `vae_from_config` and `text_encoder_from_config` return a module
and its param shapes (jax.eval_shape: nothing computed, no memory); `random_params`
fills such shapes with random weights (tiny test models, the toy prior's
initialisation, the benchmark's SD-2.1-shaped models); `load_tokenizer` reads a
tokenizer directory. With stable_diffusion.py, the only modules that import
diffusers and transformers (seconds to import: guidance/__init__.py and
toy_prior.py reach them only on first use).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Params = Mapping[str, Any]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class _DropFlaxDeprecation(logging.Filter):
  """diffusers 0.3x / transformers 4.x log "Flax classes are deprecated" from every
  Flax module's setup(), i.e. dozens of times per trace. We pin both below the
  versions that drop Flax (setup.py), so the message carries no news for us."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "classes are deprecated" not in record.getMessage()


def _silence_flax_deprecations() -> None:
  import diffusers.utils.logging  # pylint: disable=g-import-not-at-top
  import transformers.utils.logging  # pylint: disable=g-import-not-at-top

  drop = _DropFlaxDeprecation()
  for lib in (diffusers.utils.logging, transformers.utils.logging):
    root = lib.get_logger()  # the library's root logger; children propagate to its handlers
    root.addFilter(drop)
    for handler in root.handlers:
      handler.addFilter(drop)


with warnings.catch_warnings():
  warnings.simplefilter("ignore", FutureWarning)
  warnings.simplefilter("ignore", DeprecationWarning)
  _silence_flax_deprecations()
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import (CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig,  # pylint: disable=g-import-not-at-top
                            FlaxCLIPTextModel, FlaxCLIPVisionModel)


def _flax_fields(cls, config: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of a diffusers config that the Flax class takes. PyTorch configs
  carry more (act_fn, norm_eps, upcast_attention, ...) that the Flax classes do not
  implement; diffusers would log each one on every load."""
  names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "parent", "name"}
  return {k: v for k, v in config.items() if k in names}


# PyTorch UNet options that diffusers' Flax UNet does not read, with the values it
# silently assumes (it hard-codes GroupNorm(32 groups), for one). A checkpoint with
# other values would load and compute something else.
_FLAX_UNET_ASSUMES = {
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "class_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "mid_block_scale_factor": 1, "downsample_padding": 1, "dual_cross_attention": False,
}


def unet_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> tuple[FlaxUNet2DConditionModel, Params]:
  """The UNet module of a diffusers config and its param shapes (nothing computed)."""
  unsupported = {k: config[k] for k, v in _FLAX_UNET_ASSUMES.items() if config.get(k, v) != v}
  if unsupported:
    raise ValueError(f"diffusers' Flax UNet cannot run this UNet config: it implements "
                     f"{ {k: _FLAX_UNET_ASSUMES[k] for k in unsupported} }, the config has {unsupported}")
  unet = FlaxUNet2DConditionModel.from_config(_flax_fields(FlaxUNet2DConditionModel, config), dtype=dtype)
  return unet, jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))


def vae_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> tuple[FlaxAutoencoderKL, Params]:
  """The VAE module of a diffusers config and its param shapes."""
  vae = FlaxAutoencoderKL.from_config(_flax_fields(FlaxAutoencoderKL, config), dtype=dtype)
  return vae, jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))


def text_encoder_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> tuple[FlaxCLIPTextModel, Params]:
  """The CLIP text model of a transformers config and its param shapes."""
  cfg = CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
  model = FlaxCLIPTextModel(cfg, dtype=dtype, _do_init=False)
  return model, jax.eval_shape(lambda k: model.init_weights(k, (1, 1)), jax.random.PRNGKey(0))


def image_encoder_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> tuple[FlaxCLIPVisionModel, Params]:
  """CLIPVisionModelWithProjection's halves: the Flax CLIP vision tower of a
  transformers config and the param shapes {"vision_model", "visual_projection":
  {"kernel": (hidden, projection_dim)}} (transformers has no Flax class with the
  projection; the projection is a bias-free Linear on the pooled output)."""
  cfg = CLIPVisionConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
  model = FlaxCLIPVisionModel(cfg, dtype=dtype, _do_init=False)
  shapes = dict(jax.eval_shape(lambda k: model.init_weights(k, (1, cfg.image_size, cfg.image_size, 3)),
                               jax.random.PRNGKey(0)))
  shapes["visual_projection"] = {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size, cfg.projection_dim), jnp.float32)}
  return model, shapes


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
  """The CLIPTokenizer of a tokenizer directory (never downloads)."""
  return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def random_params(shapes: Params, seed: int, dtype: Any = None, device: jax.Device | None = None) -> dict:
  """Random weights for a param-shape tree: fan-in-scaled kernels, norm scales near
  1, small biases and embeddings, so activations stay O(1) through the layers (and
  timings see ordinary numbers, not NaNs or denormals).

  Drawn leaf by leaf with numpy (a jax.random draw would compile a program per leaf
  shape); with a `device`, each leaf goes there as soon as it is drawn, so the host
  never holds more than one leaf (seconds for SD's 1.3 B weights).

  Args:
    shapes: nested dict of leaves with `.shape` (jax.eval_shape of an init).
    dtype: the leaves' dtype (default float32).
    device: None: numpy arrays; else jax arrays on it.

  Returns:
    Nested dict of arrays of those shapes.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in sorted(traverse_util.flatten_dict(dict(shapes)).items()):
    shape = tuple(leaf.shape)
    z = rng.standard_normal(shape).astype(np.float32)
    if path[-1] == "kernel":
      z = z / np.sqrt(np.prod(shape[:-1]))
    elif path[-1] == "scale":
      z = 1.0 + 0.1 * z
    elif path[-1] == "embedding":
      z = 0.5 * z
    else:
      z = 0.1 * z
    z = z.astype(np.float32 if dtype is None else dtype)
    flat[path] = z if device is None else jax.device_put(z, device)
  return traverse_util.unflatten_dict(flat)
