"""The 3D scene: a NeRF field (density + albedo) and the background model.

Flax modules that hold parameters and call the pure math of `encoding.py`; they are
used only through `apply`, and `render.py` sees them as plain functions.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamfusion_jax import encoding as encoding_lib

Array = jax.Array


# Pre-activation density blobs, named after their sources, with each source's own
# strength, radius and density activation (threestudio's `density_bias` values
# "blob_dreamfusion" and "blob_magic3d", models/geometry/implicit_volume.py):
#   "dreamfusion": strength exp(-|x|^2 / (2 radius^2)), 5, 0.2, exp activation
#     (DreamFusion appendix A; stable-dreamfusion's exp-activation blob);
#   "magic3d":     strength (1 - |x| / radius), 10, 0.5, softplus activation
#     (Magic3D; threestudio's default, also in its dreamfusion-sd config).
BLOB_SOURCES = {
    "dreamfusion": {"blob_strength": 5.0, "blob_radius": 0.2, "density_activation": "exp"},
    "magic3d": {"blob_strength": 10.0, "blob_radius": 0.5, "density_activation": "softplus"},
}
BLOB_KINDS = ("dreamfusion", "magic3d", "none")


def check_blob_kind(kind: str) -> None:
  """Raises ValueError naming `config.field.blob_kind` unless `kind` is in BLOB_KINDS."""
  if kind not in BLOB_KINDS:
    raise ValueError(f"config.field.blob_kind must be one of {', '.join(BLOB_KINDS)}; got {kind!r}")


def density_blob(positions: Array, *, kind: str, strength: float, radius: float) -> Array:
  """Density bias that starts optimisation from a blob at the origin (see BLOB_SOURCES).

  "dreamfusion": strength * exp(-|x|^2 / (2 radius^2)), a Gaussian bump, positive everywhere.
  "magic3d": strength * (1 - |x| / radius), linear in |x|, negative outside `radius`.
  "none": zero.

  Args:
    positions: (..., 3).

  Returns:
    (...,) pre-activation density bias.
  """
  check_blob_kind(kind)
  sq = jnp.sum(positions**2, axis=-1)
  if kind == "dreamfusion":
    return strength * jnp.exp(-0.5 * sq / radius**2)
  if kind == "magic3d":
    # sqrt(sq + eps): a finite gradient at the origin keeps normals defined there.
    return strength * (1.0 - jnp.sqrt(sq + 1e-12) / radius)
  return jnp.zeros_like(sq)


def activate_density(raw: Array, kind: str) -> Array:
  """Non-negative density from the network's raw output ("softplus" or "exp")."""
  if kind == "softplus":
    return jax.nn.softplus(raw)
  if kind == "exp":
    # Clamp before exp: an early large raw value would overflow to inf and NaN the step.
    return jnp.exp(jnp.minimum(raw, 15.0))
  raise ValueError(f"density activation must be softplus or exp; got {kind!r}")


class NeRFField(nn.Module):
  """Encoding -> MLP -> (density, albedo) inside the cube [-bound, bound]^3.

  Attributes:
    encoding: "hashgrid" or "positional".
    hash_grid: hash-grid settings (when encoding == "hashgrid").
    num_frequencies: positional-encoding frequencies (when encoding == "positional").
    hidden_dim, num_layers: the MLP (num_layers hidden layers of ReLU).
    density_activation: "softplus" or "exp".
    blob_kind, blob_strength, blob_radius: see `density_blob`.
    bound: half-size of the cube mapped onto the encoding's unit cube.
  """

  encoding: str = "hashgrid"
  hash_grid: encoding_lib.HashGridConfig = encoding_lib.HashGridConfig()
  num_frequencies: int = 6
  hidden_dim: int = 64
  num_layers: int = 2
  density_activation: str = "softplus"
  blob_kind: str = "magic3d"
  blob_strength: float = 10.0
  blob_radius: float = 0.5
  bound: float = 1.0

  @nn.compact
  def __call__(self, positions: Array, level_mask: Optional[Array] = None) -> tuple[Array, Array]:
    """Args: positions (..., 3) in world units; level_mask (L,) for the hash grid.

    Returns:
      density (...,) >= 0 and albedo (..., 3) in (0, 1).
    """
    if self.encoding == "hashgrid":
      unit = (positions / self.bound + 1.0) * 0.5
      features = encoding_lib.HashGridEncoding(self.hash_grid, name="hash_grid")(unit, level_mask)
    elif self.encoding == "positional":
      features = encoding_lib.positional_encoding(positions / self.bound, self.num_frequencies)
    else:
      raise ValueError(f"field encoding must be hashgrid or positional; got {self.encoding!r}")
    h = features
    for i in range(self.num_layers):
      h = nn.relu(nn.Dense(self.hidden_dim, name=f"hidden_{i}")(h))
    out = nn.Dense(4, name="output")(h)
    blob = density_blob(positions, kind=self.blob_kind, strength=self.blob_strength, radius=self.blob_radius)
    density = activate_density(out[..., 0] + blob, self.density_activation)
    albedo = jax.nn.sigmoid(out[..., 1:])
    return density, albedo


class BackgroundMLP(nn.Module):
  """Background colour as a function of the ray direction: PE -> MLP -> sigmoid."""

  num_frequencies: int = 4
  hidden_dim: int = 32
  num_layers: int = 1

  @nn.compact
  def __call__(self, directions: Array) -> Array:
    """Args: directions (..., 3) unit vectors. Returns (..., 3) colours in (0, 1)."""
    h = encoding_lib.positional_encoding(directions, self.num_frequencies)
    for i in range(self.num_layers):
      h = nn.relu(nn.Dense(self.hidden_dim, name=f"hidden_{i}")(h))
    return jax.nn.sigmoid(nn.Dense(3, name="output")(h))
