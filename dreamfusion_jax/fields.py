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


def density_blob(positions: Array, *, kind: str, strength: float, radius: float) -> Array:
  """Density bias that starts optimisation from a blob at the origin.

  "gaussian" (Magic3D, threestudio): strength * exp(-|x|^2 / (2 radius^2)).
  "linear" (DreamFusion appendix A.2): strength * (1 - |x| / radius), negative outside.
  "none": zero.

  Args:
    positions: (..., 3).

  Returns:
    (...,) pre-activation density bias.
  """
  sq = jnp.sum(positions**2, axis=-1)
  if kind == "gaussian":
    return strength * jnp.exp(-0.5 * sq / radius**2)
  if kind == "linear":
    # sqrt(sq + eps): a finite gradient at the origin keeps normals defined there.
    return strength * (1.0 - jnp.sqrt(sq + 1e-12) / radius)
  if kind == "none":
    return jnp.zeros_like(sq)
  raise ValueError(f"density blob kind must be gaussian, linear or none; got {kind!r}")


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
  blob_kind: str = "linear"
  blob_strength: float = 5.0
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


def solid_background(key: Optional[Array], batch_size: int, *, kind: str, color=(1.0, 1.0, 1.0)) -> Array:
  """Per-image solid background: "fixed" (the given colour) or "random" (uniform RGB).

  Returns:
    (batch_size, 3) colours.
  """
  if kind == "fixed":
    return jnp.broadcast_to(jnp.asarray(color, jnp.float32), (batch_size, 3))
  if kind == "random":
    return jax.random.uniform(key, (batch_size, 3))
  raise ValueError(f"solid background kind must be fixed or random; got {kind!r}")
