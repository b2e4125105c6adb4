"""A Stable Diffusion checkpoint directory in the diffusers layout: find, check, read, write.

The layout: unet/, vae/, text_encoder/ (config.json + weights), tokenizer/ (vocab.json,
merges.txt), scheduler/scheduler_config.json and model_index.json. A pixel-space
model (the embedded toy prior, like Imagen's base model) has no vae/ and its
model_index.json lists none.

  resolve_model_dir    a directory or a hub id (from the local HF cache only) -> the
                       directory, with every file checked before anything is built.
  load_params          one component's weights (Flax msgpack or PyTorch-layout
                       safetensors, sharded or not) as a Flax param tree, checked
                       against the module's param shapes.
  write_pipeline_dir   params and configs -> such a directory, with the
                       character-level tokenizer (char_tokenizer.py).

No diffusers or transformers import (the Flax modules are built by sd_models.py):
the embedded prior's directory is written and checked at the cost of numpy,
safetensors and flax.serialization.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from dreamfusion_jax.guidance import char_tokenizer
from dreamfusion_jax.guidance import weight_conversion

Params = Mapping[str, Any]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"

# Weight files we can read, in order of preference, per component kind; the first
# two are what `write_pipeline_dir` writes ("flax", "safetensors").
DIFFUSERS_WEIGHTS = ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors")
TRANSFORMERS_WEIGHTS = ("flax_model.msgpack", "model.safetensors", "model.safetensors.index.json",
                        "model.fp16.safetensors")
_LAYOUT = {
    "unet": (("config.json",), DIFFUSERS_WEIGHTS),
    "vae": (("config.json",), DIFFUSERS_WEIGHTS),
    "text_encoder": (("config.json",), TRANSFORMERS_WEIGHTS),
    "tokenizer": (("vocab.json", "merges.txt"), ()),
    "scheduler": (("scheduler_config.json",), ()),
}
# Zero-1-to-3 (guidance/priors/zero123.py): the UNet takes the noisy latents and the input
# image's latents (8 channels), the CLIP image encoder with its projection, and the
# `cc_projection` Linear from image embedding + camera to the cross-attention width.
ZERO123_LAYOUT = {
    "unet": (("config.json",), DIFFUSERS_WEIGHTS),
    "vae": (("config.json",), DIFFUSERS_WEIGHTS),
    "image_encoder": (("config.json",), TRANSFORMERS_WEIGHTS),
    "cc_projection": (("config.json",), DIFFUSERS_WEIGHTS),
    "scheduler": (("scheduler_config.json",), ()),
}
_HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "feature_extractor/*",
                 "*/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "image_encoder/model.safetensors"]


class ModelNotFoundError(FileNotFoundError):
  """The Stable Diffusion checkpoint is not on this machine (nothing is downloaded)."""


def _not_found(model: str, reason: str) -> ModelNotFoundError:
  return ModelNotFoundError(
      f"Stable Diffusion model {model!r} is not available: {reason}.\n"
      "Provide it in one of these ways:\n"
      f"  * download it (on a machine with network access):\n"
      f"      huggingface-cli download {model if model.count('/') == 1 else DEFAULT_MODEL} "
      "--include 'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*' --local-dir DIR\n"
      "    and run with --config.guidance.model=DIR (a local directory in the diffusers layout:\n"
      "    unet/, vae/, text_encoder/, tokenizer/, scheduler/);\n"
      "  * or put the hub snapshot in the Hugging Face cache (HF_HOME) and pass its hub id;\n"
      "  * or train against the embedded toy prior: --config=configs/toy.py.")


def _looks_like_hub_id(model: str) -> bool:
  parts = model.split("/")
  return (len(parts) == 2 and all(parts) and not model.startswith((".", "~"))
          and not os.path.isabs(model))


def read_json(path: pathlib.Path) -> dict:
  with open(path) as f:
    return json.load(f)


def is_pixel_space(root: pathlib.Path) -> bool:
  """A pixel-space diffusion model (like the embedded toy prior, or Imagen's base
  model): its model_index.json lists no VAE, and the UNet denoises RGB directly."""
  index = root / "model_index.json"
  return index.is_file() and "vae" not in read_json(index)


def is_zero123(root: pathlib.Path) -> bool:
  """A Zero-1-to-3 directory (an image encoder and cc_projection, no text encoder)."""
  return (root / "cc_projection").is_dir()


def _missing_files(root: pathlib.Path, layout: Mapping[str, tuple]) -> list[str]:
  missing = []
  pixel_space = is_pixel_space(root)
  for folder, (required, weights) in layout.items():
    if folder == "vae" and pixel_space:
      continue
    for name in required:
      if not (root / folder / name).is_file():
        missing.append(f"{folder}/{name}")
    if weights and not any((root / folder / w).is_file() for w in weights):
      missing.append(f"{folder}/{{{' | '.join(weights)}}}")
  return missing


def resolve_model_dir(model: str, *, local_files_only: bool = True,
                      cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The local directory of a checkpoint given as a directory or a hub id, Stable
  Diffusion's layout or Zero-1-to-3's (ZERO123_LAYOUT, told by its cc_projection/).

  A hub id is looked up in the Hugging Face cache only (`local_files_only`), so an
  offline machine fails at once instead of waiting on the network.

  Raises:
    ModelNotFoundError: no such directory, the id is not cached, or files are missing.
  """
  path = pathlib.Path(model).expanduser()
  if path.is_dir():
    root = path
  elif not _looks_like_hub_id(model):
    raise _not_found(model, f"there is no directory {str(path)!r}")
  else:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top

    try:
      root = pathlib.Path(huggingface_hub.snapshot_download(
          model, local_files_only=local_files_only, cache_dir=cache_dir,
          allow_patterns=None if local_files_only else _HUB_PATTERNS))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.HfHubHTTPError, hf_errors.HFValidationError,
            OSError, ValueError) as e:
      where = "the local Hugging Face cache" if local_files_only else "the hub"
      raise _not_found(model, f"it is not a local directory and not in {where} "
                       f"({type(e).__name__})") from None
  missing = _missing_files(root, ZERO123_LAYOUT if is_zero123(root) else _LAYOUT)
  if missing:
    raise _not_found(model, f"{root} lacks " + ", ".join(missing))
  return root


def _read_weights(folder: pathlib.Path, candidates: Sequence[str]) -> tuple[str, Any, pathlib.Path]:
  """("flax", nested dict) or ("pytorch", flat state dict), from the first file present."""
  for name in candidates:
    path = folder / name
    if not path.is_file():
      continue
    if name.endswith(".msgpack"):
      return "flax", flax.serialization.msgpack_restore(path.read_bytes()), path
    if name.endswith(".index.json"):  # sharded safetensors
      shards = sorted(set(read_json(path)["weight_map"].values()))
      state = {}
      for shard in shards:
        state.update(safetensors.numpy.load_file(folder / shard))
      return "pytorch", state, path
    return "pytorch", safetensors.numpy.load_file(path), path
  raise FileNotFoundError(f"none of {candidates} in {folder}")  # resolve_model_dir checked already


def _to_dtype(tree, dtype) -> Any:
  """Floating leaves to `dtype`, in numpy: one transfer to the device afterwards."""

  def cast(a):
    a = np.asarray(a)
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # jnp: knows bfloat16

  return jax.tree.map(cast, tree)


def load_params(folder: pathlib.Path, candidates: Sequence[str], shapes: Params, dtype) -> Params:
  """Weights of one component (DIFFUSERS_WEIGHTS or TRANSFORMERS_WEIGHTS in `folder`)
  as a Flax param tree of numpy arrays in `dtype`, checked against `shapes` (the
  module's jax.eval_shape param tree).

  Raises:
    WeightMismatchError (a ValueError): names or shapes do not fit `shapes`.
  """
  layout, tensors, path = _read_weights(folder, candidates)
  if layout == "flax":
    weight_conversion.check_tree_matches(tensors, shapes, name=str(path))
    params = tensors
  else:
    params = weight_conversion.pytorch_to_flax(tensors, shapes, name=str(path))
  return _to_dtype(params, dtype)


def write_json(path: pathlib.Path, obj: Mapping) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _class_prefix(fmt: str) -> str:
  if fmt not in ("flax", "safetensors"):
    raise ValueError(f"fmt={fmt!r}; known: 'flax', 'safetensors'")
  return "Flax" if fmt == "flax" else ""


def write_component(folder: pathlib.Path, config: Mapping, params: Mapping, weight_files: Sequence[str], *,
                    fmt: str) -> None:
  """One component's config.json and weights: weight_files[0] (Flax msgpack) for
  fmt "flax", weight_files[1] (PyTorch names and layouts, safetensors) otherwise."""
  _class_prefix(fmt)
  write_json(folder / "config.json", config)
  tree = jax.tree.map(np.asarray, dict(params))
  if fmt == "flax":
    (folder / weight_files[0]).write_bytes(flax.serialization.to_bytes(tree))
  else:
    safetensors.numpy.save_file(weight_conversion.flax_to_pytorch(tree), str(folder / weight_files[1]),
                                metadata={"format": "pt"})


def write_pipeline_dir(path: str | os.PathLike, params: Mapping[str, Mapping], *, fmt: str,
                       unet_config: Mapping, vae_config: Mapping | None, text_encoder_config: Mapping,
                       scheduler_config: Mapping, max_length: int) -> pathlib.Path:
  """Writes params and configs in the diffusers layout, with the character-level
  tokenizer (char_tokenizer.py; the text encoder's vocab_size must be its size).

  Not atomic: write into a fresh directory and rename it (toy_prior.write_prior_dir).

  Args:
    path: the directory to create (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    params: {"unet", "vae", "text_encoder"} Flax param trees ("vae" unused when
      vae_config is None: a pixel-space model, whose model_index.json lists no VAE).
    fmt: "flax" (diffusion_flax_model.msgpack / flax_model.msgpack, as the Flax
      classes' save_pretrained writes them) or "safetensors" (PyTorch names and
      layouts: diffusion_pytorch_model.safetensors / model.safetensors).
    max_length: the tokenizer's model_max_length (the text encoder's positions).

  Returns:
    The directory.
  """
  root = pathlib.Path(path)
  prefix = _class_prefix(fmt)
  components = {
      "unet": ({"_class_name": f"{prefix}UNet2DConditionModel", **unet_config}, DIFFUSERS_WEIGHTS),
      "text_encoder": (dict(text_encoder_config), TRANSFORMERS_WEIGHTS),
  }
  if vae_config is not None:
    components["vae"] = ({"_class_name": f"{prefix}AutoencoderKL", **vae_config}, DIFFUSERS_WEIGHTS)
  for name, (config, weight_files) in components.items():
    write_component(root / name, config, params[name], weight_files, fmt=fmt)
  char_tokenizer.write_tokenizer(root / "tokenizer", max_length=max_length)
  write_json(root / "scheduler" / "scheduler_config.json", scheduler_config)
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
  write_json(root / "model_index.json", index)
  return root
