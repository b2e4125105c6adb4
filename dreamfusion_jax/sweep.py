"""Grids of config overrides: one training run per combination (big_vision style)."""

from __future__ import annotations

import itertools
import re

# What may differ between the scenes of one multi-scene job (multiscene.py); here, not
# there, so that scripts/sweep.py can group runs without importing JAX.
SCENE_FIELDS = ("prompt", "seed", "optim.lr", "guidance.guidance_scale", "loss.orientation_weight",
                "loss.opacity_weight", "loss.entropy_weight")


def follow_steps(config, times: int = 1):
  """`times` x config.train.steps, as a value that follows it: assign it to a field whose
  value is a number of steps (an annealing length, a densify window), and an override
  of train.steps (--config.train.steps=N, a sweep axis, a variant set later) moves the
  field with it, while an override of the field itself changes that field alone.

  (An ml_collections reference derived by an operation: `times` x get_ref("steps").
  Assigning `train.get_ref("steps")` itself would link both ways: an override of the
  field would set train.steps too.)
  """
  return config.train.get_ref("steps") * times


def parse_axis(spec: str) -> tuple[str, list[str]]:
  """"optim.lr=1e-2,5e-3" -> ("optim.lr", ["1e-2", "5e-3"]).

  Values are kept as strings: they are passed on as --config.<key>=<value> flags, and
  ml_collections parses them with the field's own type. Wrap a tuple value in
  brackets to keep its commas: "cameras.radius_range=[(1,1.5),(1.5,2)]".
  """
  key, sep, values = spec.partition("=")
  key = key.strip()
  if not sep or not key or not values.strip():
    raise ValueError(f"sweep axis must look like key=v1,v2,...; got {spec!r}")
  values = values.strip()
  if values.startswith("[") and values.endswith("]"):
    items = re.findall(r"\([^()]*\)|[^,\s]+", values[1:-1])
  else:
    items = [v.strip() for v in values.split(",")]
  if any(not v for v in items):
    raise ValueError(f"empty value in sweep axis {spec!r}")
  return key, items


def grid(specs: list[str]) -> list[dict[str, str]]:
  """The cartesian product of the axes, as one {key: value} dict per run."""
  axes = [parse_axis(s) for s in specs]
  keys = [k for k, _ in axes]
  if len(set(keys)) != len(keys):
    raise ValueError(f"a key appears in two sweep axes: {keys}")
  return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def run_name(overrides: dict[str, str]) -> str:
  """A directory name for one combination: "lr=0.01,guidance_scale=50"."""
  parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items()]
  name = ",".join(parts) or "base"
  return re.sub(r"[^A-Za-z0-9=,._+-]", "_", name)


def override_flags(overrides: dict[str, str]) -> list[str]:
  return [f"--config.{key}={value}" for key, value in overrides.items()]


def groups(runs: list[dict[str, str]], scene_fields: tuple[str, ...]) -> list[list[dict[str, str]]]:
  """The runs split into jobs: runs whose overrides differ only in `scene_fields` share
  one multi-scene job (multiscene.py); any other swept field starts another job.
  Jobs keep the grid's order."""
  out: dict[tuple, list] = {}
  for r in runs:
    key = tuple(sorted((k, v) for k, v in r.items() if k not in scene_fields))
    out.setdefault(key, []).append(r)
  return list(out.values())


def load_config_module(path: str):
  """The config file at `path` as a module, loaded by path (as --config loads it), so
  configs/ need not be importable; config files load their base configs with it."""
  import importlib.util
  import os

  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_sibling_config(anchor_file: str, name: str):
  """The config module `name` in the folder of `anchor_file` (a config file's
  `__file__`): how a config loads the base configs beside it."""
  import os

  return load_config_module(os.path.join(os.path.dirname(os.path.abspath(anchor_file)), f"{name}.py"))


def load_config_file(spec: str):
  """`path[:variant]` -> the config its get_config(variant) returns (as --config reads it)."""
  import os

  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config={spec}: no such config file {path!r}")
  module = load_config_module(path)
  return module.get_config(variant) if variant else module.get_config()


def scene_config(base, overrides: dict[str, str]):
  """A copy of `base` with `overrides` ({key: flag text}) applied, then resolved: fields
  that follow train.steps (follow_steps) see a train.steps override, as on the command
  line; `base` is unchanged."""
  import copy

  config = copy.deepcopy(base)  # keeps the references (copy_and_resolve_references would cut them first)
  for key, value in overrides.items():
    apply_override(config, key, value)
  return config.copy_and_resolve_references()


def apply_override(config, key: str, value: str) -> None:
  """Sets config.<key> from its flag text, parsed as the field's own type (as
  --config.<key>=<value> would be)."""
  import ast

  *path, leaf = key.split(".")
  node = config
  try:
    for part in path:
      node = node[part]
    current = node[leaf]
  except (KeyError, AttributeError):
    raise ValueError(f"{key}={value}: the config has no field {key!r}") from None
  try:
    if isinstance(current, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
      parsed = value.lower() in ("true", "1")
    elif isinstance(current, int):
      parsed = int(value)
    elif isinstance(current, float):
      parsed = float(value)
    elif isinstance(current, str):
      parsed = value
    else:
      parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    raise ValueError(f"{key}={value}: not a valid {type(current).__name__}") from None
  node[leaf] = parsed
