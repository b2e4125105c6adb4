"""PyTorch-layout state dicts <-> Flax parameter trees, with numpy only (no torch).

Diffusers' and transformers' own `from_pt=True` imports torch and reads `.bin`
pickles; checkpoints on the hub are mostly `*.safetensors` in the PyTorch layout. We
read those with `safetensors.numpy` and map every tensor onto the parameter tree
of the Flax module, guided by that tree (from `jax.eval_shape` of the module's
init, so nothing is computed):

  names     "down_blocks.0.resnets.1" -> "down_blocks_0/resnets_1" (diffusers' Flax
            modules number list entries with "_"); transformers' Flax CLIP keeps
            "layers/0". Both spellings are tried against the target tree.
  conv      weight (O, I, kh, kw) -> kernel (kh, kw, I, O)
  linear    weight (O, I) -> kernel (I, O)
  norms     weight -> scale (GroupNorm, LayerNorm; "gamma"/"beta" of old checkpoints)
  embedding weight -> embedding
  VAE attn  to_q/to_k/to_v/to_out.0 (current diffusers) or query/key/value/proj_attn
            (older checkpoints, sometimes stored as 1x1 convs) -> query/key/value/proj_attn

`pytorch_to_flax` raises `WeightMismatchError` listing every missing, unexpected or
mis-shaped tensor instead of leaving random weights behind.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import traverse_util

# Non-parameter tensors some checkpoints carry (CLIP's position_ids buffer).
IGNORED_SUFFIXES = ("position_ids", "num_batches_tracked")

# VAE attention projections: current diffusers name -> Flax (and old diffusers) name.
_VAE_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# PyTorch module names that contain "_<digit>" without being list entries.
_ATOMIC_NAMES = frozenset({"linear_1", "linear_2"})


class WeightMismatchError(ValueError):
  """A checkpoint does not fit the model its config describes."""


def _module_path_candidates(parts: list[str]) -> list[tuple[str, ...]]:
  """The Flax spellings of a PyTorch module path ("a.0.b" -> a/0/b and a_0/b)."""
  merged: list[str] = []
  for p in parts:
    if p.isdigit() and merged:
      merged[-1] = f"{merged[-1]}_{p}"
    else:
      merged.append(p)
  candidates = [tuple(merged), tuple(parts)]
  renamed = tuple(_VAE_ATTENTION_NAMES.get(p, p) for p in merged)
  if renamed != candidates[0]:
    candidates.append(renamed)
  return candidates


def _leaf_candidates(leaf: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """(Flax leaf name, converted array) pairs a PyTorch tensor could become."""
  if leaf in ("bias", "beta"):
    return [("bias", array)]
  if leaf not in ("weight", "gamma"):
    return [(leaf, array)]
  if array.ndim == 1:
    return [("scale", array)]
  if array.ndim == 4:
    out = [("kernel", array.transpose(2, 3, 1, 0))]
    if array.shape[2:] == (1, 1):  # a 1x1 conv stored where Flax has a Dense
      out.append(("kernel", array[:, :, 0, 0].T))
    return out
  if array.ndim == 2:
    # A 1x1 conv in Flax where PyTorch has a Linear (proj_in/out of some SD 2 UNets).
    return [("embedding", array), ("kernel", array.T), ("kernel", array.T[None, None])]
  return [("kernel", array)]


def pytorch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target_shapes: Mapping,
    *,
    name: str = "model",
) -> dict:
  """Maps a PyTorch state dict onto a Flax parameter tree of known shapes.

  Args:
    state_dict: PyTorch key -> numpy array (e.g. from safetensors.numpy.load_file).
    target_shapes: nested dict of the Flax module's params; leaves need `.shape`
      (jax.ShapeDtypeStruct from jax.eval_shape of the init, or arrays).
    name: what to call the model in error messages (e.g. a file path).

  Returns:
    Nested dict of numpy arrays with exactly the structure and shapes of
    `target_shapes`.

  Raises:
    WeightMismatchError: a tensor has no place in the tree, has the wrong shape, or
      a parameter of the tree has no tensor.
  """
  target = traverse_util.flatten_dict(dict(target_shapes))
  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, wrong_shape = [], []
  for pt_key, array in state_dict.items():
    if pt_key.endswith(IGNORED_SUFFIXES):
      continue
    parts = pt_key.split(".")
    candidates = [(module + (leaf,), converted)
                  for module in _module_path_candidates(parts[:-1])
                  for leaf, converted in _leaf_candidates(parts[-1], np.asarray(array))]
    fits = [(key, a) for key, a in candidates if key in target and tuple(target[key].shape) == a.shape]
    named = [key for key, _ in candidates if key in target]
    if fits:
      out[fits[0][0]] = fits[0][1]
    elif named:
      wrong_shape.append(f"{pt_key} {tuple(np.shape(array))} vs {'/'.join(named[0])} "
                         f"{tuple(target[named[0]].shape)}")
    else:
      unexpected.append(pt_key)
  missing = sorted("/".join(k) for k in target if k not in out)
  if missing or unexpected or wrong_shape:
    raise WeightMismatchError(_mismatch_message(name, missing, unexpected, wrong_shape))
  return traverse_util.unflatten_dict(out)


def check_tree_matches(params: Mapping, target_shapes: Mapping, *, name: str = "model") -> None:
  """Raises WeightMismatchError unless `params` has exactly the keys and shapes of
  `target_shapes` (both nested dicts)."""
  got = traverse_util.flatten_dict(dict(params))
  want = traverse_util.flatten_dict(dict(target_shapes))
  missing = sorted("/".join(k) for k in want if k not in got)
  unexpected = sorted("/".join(k) for k in got if k not in want)
  wrong_shape = [f"{'/'.join(k)} {tuple(np.shape(got[k]))} vs {tuple(want[k].shape)}"
                 for k in sorted(want) if k in got and tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if missing or unexpected or wrong_shape:
    raise WeightMismatchError(_mismatch_message(name, missing, unexpected, wrong_shape))


def _mismatch_message(name: str, missing, unexpected, wrong_shape, limit: int = 20) -> str:
  lines = [f"The weights of {name} do not match the model built from its config.json:"]
  for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
    if keys:
      shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
      lines.append(f"  {len(keys)} {title}: {shown}")
  lines.append("Is the config.json from the same checkpoint as the weights?")
  return "\n".join(lines)


def flax_to_pytorch(params: Mapping, *, vae_attention_names: bool = True) -> dict[str, np.ndarray]:
  """The inverse map: a Flax param tree -> PyTorch-layout state dict (current names).

  Used to write PyTorch-format test checkpoints without torch; the PyTorch-parity
  test checks it against real diffusers/transformers state dicts.

  Args:
    params: nested dict of arrays (a diffusers UNet/VAE or transformers CLIP tree).
    vae_attention_names: write the VAE's query/key/value/proj_attn as current
      diffusers' to_q/to_k/to_v/to_out.0.

  Returns:
    PyTorch key -> numpy array.
  """
  inverse_attention = {v: k for k, v in _VAE_ATTENTION_NAMES.items()} if vae_attention_names else {}
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    *module, leaf = path
    names = []
    for part in module:
      part = inverse_attention.get(part, part)
      m = re.fullmatch(r"(.+)_(\d+)", part)
      names.append(f"{m[1]}.{m[2]}" if m and part not in _ATOMIC_NAMES else part)
    array = np.asarray(value)
    if leaf == "kernel":
      array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    pt_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    out[".".join(names + [pt_leaf])] = np.ascontiguousarray(array)
  return out
