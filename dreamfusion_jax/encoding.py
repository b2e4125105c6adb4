"""Input encodings for the 3D field: NeRF frequencies and the instant-ngp hash grid.

Both are pure functions on arrays; `HashGridEncoding` is the thin Flax module that
owns the hash tables and calls `hash_grid_encode`.

Hash grid (Müller et al. 2022, "Instant Neural Graphics Primitives", Sec. 3):
level l has resolution N_l = floor(N_min * b^l) with b = exp((ln N_max - ln N_min) /
(L - 1)), i.e. cells of side 1/N_l and (N_l + 1)^3 vertices at (i, j, k) / N_l. A
vertex's feature lives in that level's table of 2^T rows: at row i + j (N+1) +
k (N+1)^2 when all vertices fit (a dense grid, no collisions), else at the spatial
hash (i * 1 XOR j * 2654435761 XOR k * 805459861) mod 2^T (Eq. 4). A point's feature
is the trilinear interpolation of its cell's 8 corners; levels are concatenated.

The grid is vertex-aligned (vertex i sits at i / N_l, so 0 and 1 are vertices),
which makes "the feature at a vertex equals its table row" hold exactly; instant-ngp's
CUDA code shifts the grid by half a cell instead, which changes nothing that matters
for training.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# instant-ngp's hash primes (Eq. 4); the first is 1 so that x alone keeps coherence
# along one axis, which the paper found helps caching.
HASH_PRIMES = (1, 2654435761, 805459861)

# instant-ngp initialises the tables with U(-1e-4, 1e-4): small enough that the MLP
# first sees an almost constant input, non-zero so the levels are not symmetric.
TABLE_INIT_SCALE = 1e-4

# The 8 corners of a cell as (dx, dy, dz) offsets in {0, 1}, x varying fastest.
_CORNER_OFFSETS = np.array([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=np.uint32)


@dataclasses.dataclass(frozen=True)
class HashGridConfig:
  """Shape of a multiresolution hash grid. Frozen, so it can be a static jit arg.

  Attributes:
    num_levels: L, the number of resolution levels.
    features_per_level: F, the feature width of each table row.
    log2_table_size: T, each level's table has 2^T rows.
    base_resolution: N_min, cells per axis of the coarsest level.
    max_resolution: N_max, cells per axis of the finest level.
  """

  num_levels: int = 16
  features_per_level: int = 2
  log2_table_size: int = 19
  base_resolution: int = 16
  max_resolution: int = 2048

  def __post_init__(self):
    if self.num_levels < 1:
      raise ValueError(f"num_levels must be >= 1, got {self.num_levels}.")
    if self.features_per_level < 1:
      raise ValueError(f"features_per_level must be >= 1, got {self.features_per_level}.")
    # The hash is computed in uint32 and rows are addressed as level * 2^T + row in
    # int32 (L * 2^T < 2^31), so T is bounded well below 32.
    if not 1 <= self.log2_table_size <= 26:
      raise ValueError(f"log2_table_size must be in [1, 26], got {self.log2_table_size}.")
    if self.num_levels * 2**self.log2_table_size >= 2**31:
      raise ValueError(
        f"num_levels * 2**log2_table_size must be < 2**31, got {self.num_levels} * 2**{self.log2_table_size}."
      )
    if self.base_resolution < 1:
      raise ValueError(f"base_resolution must be >= 1, got {self.base_resolution}.")
    if self.max_resolution < self.base_resolution:
      raise ValueError(
        f"max_resolution ({self.max_resolution}) must be >= base_resolution ({self.base_resolution})."
      )
    if self.num_levels == 1 and self.max_resolution != self.base_resolution:
      raise ValueError(
        "With num_levels=1 there is no growth between levels: set "
        f"max_resolution ({self.max_resolution}) equal to base_resolution "
        f"({self.base_resolution})."
      )

  @property
  def table_size(self) -> int:
    """Rows per level, 2^T."""
    return 2**self.log2_table_size

  @property
  def output_dim(self) -> int:
    """Width of the encoding, L * F."""
    return self.num_levels * self.features_per_level

  @property
  def per_level_scale(self) -> float:
    """b = exp((ln N_max - ln N_min) / (L - 1)); 1 for a single level."""
    if self.num_levels == 1:
      return 1.0
    return math.exp((math.log(self.max_resolution) - math.log(self.base_resolution)) / (self.num_levels - 1))

  def level_resolutions(self) -> tuple[int, ...]:
    """N_l = floor(N_min * b^l) for l = 0..L-1, cells per axis of each level."""
    b = self.per_level_scale
    # exp/log round-off puts N_min * b^(L-1) a hair under N_max (e.g. 4095.9999...
    # for 16 -> 4096); the relative nudge makes the floor land on the integer the
    # formula means, far below the gap to any genuinely fractional value.
    return tuple(math.floor(self.base_resolution * b**level * (1 + 1e-9)) for level in range(self.num_levels))

  def dense_levels(self) -> tuple[bool, ...]:
    """Whether each level indexes its table densely: (N_l + 1)^3 <= 2^T."""
    return tuple((n + 1) ** 3 <= self.table_size for n in self.level_resolutions())


def _dense_index(corners: jax.Array, resolutions: jax.Array) -> jax.Array:
  """Row-major vertex index i + j (N+1) + k (N+1)^2.

  Args:
    corners: (..., L, 8, 3) uint32 integer vertex coordinates in [0, N_l].
    resolutions: (L,) uint32, N_l.
  Returns:
    (..., L, 8) uint32. Only meaningful for levels whose vertices fit the table;
    for the others it wraps around harmlessly and is discarded by the caller.
  """
  stride = (resolutions + 1)[:, None]
  return corners[..., 0] + stride * (corners[..., 1] + stride * corners[..., 2])


def _spatial_hash(corners: jax.Array) -> jax.Array:
  """instant-ngp's hash (Eq. 4) before the modulo: XOR of coordinate * prime.

  Args:
    corners: (..., 3) uint32 integer vertex coordinates.
  Returns:
    (...) uint32; the products wrap modulo 2^32, as in the CUDA implementation.
  """
  primes = jnp.asarray(HASH_PRIMES, dtype=jnp.uint32)
  h = corners * primes
  return h[..., 0] ^ h[..., 1] ^ h[..., 2]


def hash_grid_encode(
  positions: jax.Array,
  tables: jax.Array,
  config: HashGridConfig,
  *,
  level_mask: jax.Array | None = None,
) -> jax.Array:
  """Multiresolution hash encoding of points in the unit cube.

  All levels are evaluated at once: one gather over (points, levels, corners), no
  Python loop. Levels differ only in constants (resolution, dense or hashed).

  Args:
    positions: (..., 3) float, points in [0, 1]^3; values outside are clipped, so
      the encoding is constant (and its position gradient zero) outside the cube.
    tables: (L, 2^T, F) float. One array for all levels: a dense level with fewer
      than 2^T vertices leaves its trailing rows unused, which costs a little memory
      but keeps the gather a single op over a single array.
    config: the grid's static shape; must match `tables`.
    level_mask: optional (L,) float, multiplies each level's features (zero to
      switch a level off for coarse-to-fine training).
  Returns:
    (..., L * F) features, level-major: [level 0's F features, level 1's, ...].
  """
  num_levels, table_size = config.num_levels, config.table_size
  expected = (num_levels, table_size, config.features_per_level)
  if tables.shape != expected:
    raise ValueError(
      f"tables has shape {tables.shape}, the config expects {expected} "
      "(num_levels, 2**log2_table_size, features_per_level)."
    )
  if positions.shape[-1] != 3:
    raise ValueError(f"positions must have shape (..., 3), got {positions.shape}.")

  batch_shape = positions.shape[:-1]
  # Fractions at N = 2048 need ~11 bits beyond the integer part: at least float32.
  dtype = jnp.promote_types(positions.dtype, jnp.float32)
  x = positions.reshape(-1, 3).astype(dtype)
  # Clip with where, not jnp.clip: jnp.clip's gradient is 1/2 at the bounds, which
  # would halve the position gradient of points that a caller clipped onto the
  # cube's faces. This gives the one-sided derivative from inside there.
  x = jnp.where(x < 0.0, 0.0, jnp.where(x > 1.0, 1.0, x))  # (P, 3)

  res_int = np.asarray(config.level_resolutions(), dtype=np.uint32)  # (L,)
  res = jnp.asarray(res_int, dtype=dtype)[:, None]  # (L, 1)
  scaled = x[:, None, :] * res  # (P, L, 3), in units of cells
  # x = 1 would start cell N, which has no upper corners: fold it into cell N - 1
  # with fraction 1 so the point lands exactly on vertex N.
  cell = jnp.clip(jnp.floor(scaled), 0.0, res - 1.0)
  frac = scaled - cell  # (P, L, 3) in [0, 1]; floor has zero gradient, frac carries it.

  offsets = jnp.asarray(_CORNER_OFFSETS)  # (8, 3)
  corners = cell.astype(jnp.uint32)[:, :, None, :] + offsets  # (P, L, 8, 3)
  # Trilinear weight of a corner: product over axes of frac (upper) or 1 - frac.
  weights = jnp.prod(
    jnp.where(offsets.astype(bool), frac[:, :, None, :], 1.0 - frac[:, :, None, :]),
    axis=-1,
  )  # (P, L, 8)

  dense = jnp.asarray(config.dense_levels())[:, None]  # (L, 1)
  rows = jnp.where(dense, _dense_index(corners, jnp.asarray(res_int)), _spatial_hash(corners))
  # 2^T is a power of two, so the modulo is a mask (a no-op for dense rows).
  rows = rows & jnp.uint32(table_size - 1)
  level_base = jnp.arange(num_levels, dtype=jnp.uint32)[:, None] * table_size
  flat_rows = (rows + level_base).astype(jnp.int32)  # (P, L, 8), < L * 2^T < 2^31

  flat_tables = tables.reshape(num_levels * table_size, -1)
  # Rows are in bounds by construction, so skip the gather's bounds handling.
  corner_features = flat_tables.at[flat_rows].get(mode="promise_in_bounds")  # (P,L,8,F)
  features = jnp.sum(weights[..., None] * corner_features, axis=-2)  # (P, L, F)

  if level_mask is not None:
    features = features * jnp.asarray(level_mask)[:, None]
  return features.reshape(*batch_shape, config.output_dim)


def init_hash_tables(key: jax.Array, config: HashGridConfig, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Tables drawn from U(-1e-4, 1e-4) as in instant-ngp: (L, 2^T, F)."""
  shape = (config.num_levels, config.table_size, config.features_per_level)
  return jax.random.uniform(key, shape, dtype, minval=-TABLE_INIT_SCALE, maxval=TABLE_INIT_SCALE)


class HashGridEncoding(nn.Module):
  """Owns the hash tables (param "tables", (L, 2^T, F)); calls `hash_grid_encode`."""

  config: HashGridConfig
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, positions: jax.Array, level_mask: jax.Array | None = None) -> jax.Array:
    """positions: (..., 3) in [0, 1]; level_mask: (L,) or None -> (..., L * F)."""
    tables = self.param(
      "tables",
      lambda key: init_hash_tables(key, self.config, self.param_dtype),
    )
    return hash_grid_encode(positions, tables, self.config, level_mask=level_mask)


def progressive_level_mask(
  step: jax.Array | int, *, num_levels: int, start_levels: int, update_every: int, start_step: int = 0
) -> jax.Array:
  """Coarse-to-fine level mask (Magic3D; threestudio's ProgressiveBandHashGrid).

  Levels [0, start_levels + max(step - start_step, 0) // update_every) are on, the
  rest off: the grid fits coarse shape with `start_levels` levels until `start_step`,
  then gains one finer level every `update_every` steps (threestudio's dreamfusion-sd:
  start_levels 8, start_step 2000, update_every 500).

  Args:
    step: scalar int, may be traced (no recompilation as training advances).
    num_levels: L.
    start_levels: levels on until `start_step`.
    update_every: steps between enabling successive levels, >= 1.
    start_step: the step from which levels are added, >= 0.
  Returns:
    (L,) float32 of ones then zeros.
  """
  if update_every < 1:
    raise ValueError(f"update_every must be >= 1, got {update_every}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  active = start_levels + jnp.maximum(jnp.asarray(step) - start_step, 0) // update_every
  return (jnp.arange(num_levels) < active).astype(jnp.float32)


def positional_encoding_dim(input_dim: int, num_frequencies: int, include_input: bool = True) -> int:
  """Width of `positional_encoding`'s output: D * (include_input + 2 * num_freqs)."""
  return input_dim * (int(include_input) + 2 * num_frequencies)


def positional_encoding(x: jax.Array, num_frequencies: int, include_input: bool = True) -> jax.Array:
  """NeRF's frequency encoding (Mildenhall et al. 2020, Eq. 4).

  gamma(x) = [x, sin(2^0 pi x), cos(2^0 pi x), ..., sin(2^(K-1) pi x),
  cos(2^(K-1) pi x)], each term D wide. The factor pi follows the paper (the
  official code drops it): with inputs in [-1, 1] the lowest frequency then spans
  exactly one period, so no two points of the domain share its encoding.

  Args:
    x: (..., D) float.
    num_frequencies: K, frequencies 2^k pi for k = 0..K-1.
    include_input: prepend x itself.
  Returns:
    (..., D * (include_input + 2 K)).
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # sin of 2^k pi x needs bits
  freqs = jnp.pi * 2.0 ** jnp.arange(num_frequencies, dtype=x.dtype)  # (K,)
  angles = x[..., None, :] * freqs[:, None]  # (..., K, D)
  # Interleave per frequency: (..., K, 2, D) -> [sin_k, cos_k] for each k.
  terms = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-2)
  terms = terms.reshape(*x.shape[:-1], 2 * num_frequencies * x.shape[-1])
  if include_input:
    terms = jnp.concatenate([x, terms], axis=-1)
  return terms
