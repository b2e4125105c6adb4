"""Grids of config overrides: one training run per combination (big_vision style)."""

from __future__ import annotations

import itertools
import re


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
