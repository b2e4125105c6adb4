"""Tests for dreamfusion_jax.encoding against independent numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax import encoding

# Resolutions (4, 10, 25, 64) with 2^10 rows: level 0 has 5^3 = 125 vertices and is
# dense, levels 1-3 (11^3 = 1331 and up) are hashed.
SMALL = encoding.HashGridConfig(
  num_levels=4,
  features_per_level=2,
  log2_table_size=10,
  base_resolution=4,
  max_resolution=64,
)
SMALL_RESOLUTIONS = (4, 10, 25, 64)

# O(1) random tables (not the 1e-4 init) so a wrong row or weight shows up clearly.
TABLES = np.random.default_rng(0).normal(size=(4, 2**10, 2)).astype(np.float32)

encode = jax.jit(encoding.hash_grid_encode, static_argnames="config")


def reference_row(vertex, resolution, log2_table_size):
  """Table row of an integer vertex, with Python ints (no wraparound to rely on)."""
  i, j, k = (int(c) for c in vertex)
  if (resolution + 1) ** 3 <= 2**log2_table_size:
    return i + (resolution + 1) * j + (resolution + 1) ** 2 * k
  # XOR of the full products then mod 2^32 equals XOR of the products mod 2^32.
  hashed = (i * 1) ^ (j * 2654435761) ^ (k * 805459861)
  return (hashed % 2**32) % 2**log2_table_size


def reference_encode(points, tables, resolutions, log2_table_size):
  """Loop-per-point trilinear interpolation in float64: (P, 3) -> (P, L * F)."""
  out = []
  for p in np.clip(np.asarray(points, np.float64), 0.0, 1.0):
    feats = []
    for level, n in enumerate(resolutions):
      cell = np.minimum(np.floor(p * n), n - 1)
      t = p * n - cell
      f = np.zeros(tables.shape[-1])
      for dx in (0, 1):
        for dy in (0, 1):
          for dz in (0, 1):
            d = np.array([dx, dy, dz])
            w = np.prod(np.where(d == 1, t, 1.0 - t))
            row = reference_row(cell + d, n, log2_table_size)
            f += w * tables[level, row]
      feats.append(f)
    out.append(np.concatenate(feats))
  return np.array(out)


# ------------------------------------------------------------------ resolutions


@pytest.mark.parametrize(
  "levels, n_min, n_max, expected",
  [
    (16, 16, 2048, (16, 22, 30, 42, 58, 80, 111, 153, 212, 294, 406, 561, 776, 1072, 1482, 2048)),
    # Naive float evaluation gives 63 / 4095 for the last level here.
    (4, 4, 64, SMALL_RESOLUTIONS),
    (16, 16, 4096, (16, 23, 33, 48, 70, 101, 147, 212, 307, 445, 645, 933, 1351, 1955, 2830, 4096)),
    (8, 16, 512, (16, 26, 43, 70, 115, 190, 312, 512)),
    (1, 32, 32, (32,)),
  ],
)
def test_level_resolutions_match_formula(levels, n_min, n_max, expected):
  cfg = encoding.HashGridConfig(num_levels=levels, base_resolution=n_min, max_resolution=n_max)
  resolutions = cfg.level_resolutions()
  assert resolutions == expected
  # floor(N_min * b^l) with b = (N_max / N_min)^(1 / (L - 1)), in exact-ish float64.
  b = (n_max / n_min) ** (1.0 / max(levels - 1, 1))
  exact = n_min * b ** np.arange(levels)
  np.testing.assert_array_less(exact - 1.0 + 1e-6, resolutions)
  np.testing.assert_array_less(resolutions, exact + 1e-6)
  assert math.isclose(cfg.per_level_scale, b if levels > 1 else 1.0, rel_tol=1e-12)


def test_dense_vs_hashed_selection_at_the_boundary():
  # 16^3 = 4096 = 2^12 vertices fit exactly; 17^3 do not.
  cfg = encoding.HashGridConfig(num_levels=2, log2_table_size=12, base_resolution=15, max_resolution=16)
  assert cfg.level_resolutions() == (15, 16)
  assert cfg.dense_levels() == (True, False)
  assert SMALL.dense_levels() == (True, False, False, False)


def test_dense_level_maps_vertices_onto_table_bijectively():
  # Every vertex of the 15^3-cell level, which fills its 2^12 table exactly.
  cfg = encoding.HashGridConfig(
    num_levels=2,
    features_per_level=1,
    log2_table_size=12,
    base_resolution=15,
    max_resolution=16,
  )
  tables = np.arange(2 * 4096, dtype=np.float32).reshape(2, 4096, 1)
  ijk = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), -1).reshape(-1, 3)
  rows = np.asarray(encode(jnp.asarray(ijk / 15.0, jnp.float32), tables, cfg))[:, 0]
  expected = ijk[:, 0] + 16 * ijk[:, 1] + 256 * ijk[:, 2]
  # Table values are the row numbers, so the feature reads back which row was hit.
  np.testing.assert_allclose(rows, expected, atol=1e-3)
  assert len(np.unique(np.round(rows))) == 4096


# ------------------------------------------------------------ interpolation


@pytest.mark.parametrize("level", range(4))
def test_feature_at_vertex_equals_its_table_row(level):
  n = SMALL_RESOLUTIONS[level]
  rng = np.random.default_rng(level)
  vertices = np.concatenate([rng.integers(0, n + 1, size=(20, 3)), [[0, 0, 0], [n, n, n], [n, 0, n]]])
  feats = encode(jnp.asarray(vertices / n, jnp.float32), TABLES, SMALL)
  got = np.asarray(feats)[:, 2 * level : 2 * level + 2]
  rows = [reference_row(v, n, SMALL.log2_table_size) for v in vertices]
  # i / n is not exact in float32, so a neighbour may get a weight of ~1e-7.
  np.testing.assert_allclose(got, TABLES[level, rows], atol=1e-5)


@pytest.mark.parametrize("level", range(4))
def test_cell_midpoint_is_mean_of_its_eight_corners(level):
  n = SMALL_RESOLUTIONS[level]
  cells = np.random.default_rng(10 + level).integers(0, n, size=(16, 3))
  feats = encode(jnp.asarray((cells + 0.5) / n, jnp.float32), TABLES, SMALL)
  got = np.asarray(feats)[:, 2 * level : 2 * level + 2]
  offsets = np.array([[dx, dy, dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)])
  expected = [
    TABLES[level, [reference_row(c + d, n, SMALL.log2_table_size) for d in offsets]].mean(0) for c in cells
  ]
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_matches_reference_at_random_points():
  points = np.random.default_rng(1).uniform(size=(32, 3))
  got = encode(jnp.asarray(points, jnp.float32), TABLES, SMALL)
  expected = reference_encode(points, TABLES, SMALL_RESOLUTIONS, SMALL.log2_table_size)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_batch_shape_and_clipping_outside_unit_cube():
  points = np.random.default_rng(2).uniform(-0.5, 1.5, size=(2, 3, 3))
  got = encode(jnp.asarray(points, jnp.float32), TABLES, SMALL)
  assert got.shape == (2, 3, SMALL.output_dim)
  expected = reference_encode(np.clip(points.reshape(-1, 3), 0, 1), TABLES, SMALL_RESOLUTIONS, 10)
  np.testing.assert_allclose(got.reshape(6, -1), expected, atol=1e-5)


@pytest.mark.parametrize("level", range(4))
def test_continuous_across_cell_faces(level):
  # Points on either side of a face of this level's grid: a wrong corner choice or a
  # nearest-vertex lookup would jump by O(1) there. Trilinear interpolation has
  # |d f / d x_a| <= N * max|f_u - f_v| <= 2 N max|table| along each axis.
  n = SMALL_RESOLUTIONS[level]
  rng = np.random.default_rng(20 + level)
  base = rng.uniform(size=(64, 3))
  axis = rng.integers(0, 3, size=64)
  # Faces (i / n) catch a wrong corner choice; mid-planes ((i + 1/2) / n) catch a
  # nearest-vertex lookup, which is continuous at faces.
  plane = rng.integers(1, n, size=64) + rng.choice([0.0, 0.5], size=64)
  base[np.arange(64), axis] = plane / n
  delta = rng.uniform(-1.0, 1.0, size=(64, 3)) * 1e-3 / n
  delta[np.arange(64), axis] = 1e-3 / n  # make sure every pair straddles the face
  lo, hi = base - delta, base + delta
  f_lo, f_hi = (
    np.asarray(encode(jnp.asarray(p, jnp.float32), TABLES, SMALL))[:, 2 * level : 2 * level + 2]
    for p in (lo, hi)
  )
  lipschitz = 2 * n * np.abs(TABLES[level]).max()
  bound = lipschitz * np.abs(hi - lo).sum(-1, keepdims=True) + 1e-5
  assert np.all(np.abs(f_hi - f_lo) <= bound)


# ----------------------------------------------------------------- gradients


def _finite_difference(f, x, direction, h):
  return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


def test_table_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    points = jnp.asarray(rng.uniform(size=(16, 3)))
    cotangent = jnp.asarray(rng.normal(size=(16, SMALL.output_dim)))
    tables = jnp.asarray(TABLES, jnp.float64)

    @jax.jit
    def loss(t):
      return jnp.sum(cotangent * encoding.hash_grid_encode(points, t, SMALL))

    grad = jax.jit(jax.grad(loss))(tables)
    assert jnp.count_nonzero(grad) > 0
    for seed in range(3):
      direction = jnp.asarray(np.random.default_rng(seed).normal(size=tables.shape))
      fd = _finite_difference(loss, tables, direction, 1e-3)
      np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-8)


def test_position_gradient_matches_finite_differences():
  h = 1e-6
  rng = np.random.default_rng(4)
  points = rng.uniform(size=(64, 3))
  # The encoding is only C0 across faces: keep points well inside a cell everywhere.
  for n in SMALL_RESOLUTIONS:
    frac = points * n - np.floor(points * n)
    points = points[np.all((frac > 1e-3) & (frac < 1 - 1e-3), axis=-1)]
  assert len(points) >= 16
  with jax.enable_x64(True):
    points = jnp.asarray(points)
    cotangent = jnp.asarray(rng.normal(size=(len(points), SMALL.output_dim)))
    tables = jnp.asarray(TABLES, jnp.float64)

    @jax.jit
    def per_point(x):
      return jnp.sum(cotangent * encoding.hash_grid_encode(x, tables, SMALL), axis=-1)

    # Points are independent, so the gradient of the sum is each point's own.
    grad = jax.jit(jax.grad(lambda x: per_point(x).sum()))(points)
    for axis in range(3):
      direction = jnp.zeros_like(points).at[:, axis].set(1.0)
      fd = _finite_difference(per_point, points, direction, h)
      np.testing.assert_allclose(grad[:, axis], fd, rtol=1e-6, atol=1e-6)


def test_position_gradient_on_cube_faces_is_one_sided_from_inside():
  # Points at 0 and 1 (e.g. clipped to the box by the caller) still get the full
  # derivative of the interior cell, not half of it or one through a vertex that
  # does not exist beyond the last one.
  rng = np.random.default_rng(6)
  points = rng.uniform(0.3, 0.7, size=(8, 3))
  points[:4, 0], points[4:, 1] = 1.0, 0.0
  inward = np.zeros((8, 3))
  inward[:4, 0], inward[4:, 1] = -1.0, 1.0
  with jax.enable_x64(True):
    cotangent = jnp.asarray(rng.normal(size=(8, SMALL.output_dim)))
    tables = jnp.asarray(TABLES, jnp.float64)

    @jax.jit
    def per_point(x):
      return jnp.sum(cotangent * encoding.hash_grid_encode(x, tables, SMALL), axis=-1)

    total_grad = jax.jit(jax.grad(lambda x: per_point(x).sum()))
    grad = total_grad(jnp.asarray(points))
    h = 1e-7
    one_sided = (per_point(points + h * inward) - per_point(points)) / h
    np.testing.assert_allclose(np.sum(np.asarray(grad) * inward, -1), one_sided, rtol=1e-5, atol=1e-5)
    # Outside the cube the encoding is constant, so the gradient vanishes.
    outside = jnp.asarray(points - 0.1 * inward)
    outside_grad = total_grad(outside)
    np.testing.assert_array_equal(np.sum(np.asarray(outside_grad) * inward, -1), 0.0)


# ------------------------------------------------------------ progressive mask


@pytest.mark.parametrize(
  "step, expected",
  [
    (0, [1, 1, 0, 0, 0, 0]),
    (9, [1, 1, 0, 0, 0, 0]),
    (10, [1, 1, 1, 0, 0, 0]),
    (25, [1, 1, 1, 1, 0, 0]),
    (10_000, [1, 1, 1, 1, 1, 1]),
  ],
)
def test_progressive_level_mask(step, expected):
  mask_fn = jax.jit(
    lambda s: encoding.progressive_level_mask(s, num_levels=6, start_levels=2, update_every=10)
  )
  mask = mask_fn(jnp.int32(step))  # traced step: one compilation for all steps
  assert mask.dtype == jnp.float32
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
  "step, expected",
  [
    (0, [1, 1, 0, 0, 0, 0]),
    (99, [1, 1, 0, 0, 0, 0]),
    (100, [1, 1, 0, 0, 0, 0]),  # start_step itself: the first update is update_every later
    (109, [1, 1, 0, 0, 0, 0]),
    (110, [1, 1, 1, 0, 0, 0]),
    (125, [1, 1, 1, 1, 0, 0]),
    (135, [1, 1, 1, 1, 1, 0]),
    (10_000, [1, 1, 1, 1, 1, 1]),
  ],
)
def test_progressive_level_mask_waits_for_start_step(step, expected):
  # threestudio: min(start_level + max(step - start_step, 0) // update_steps, n_levels) levels.
  mask_fn = jax.jit(lambda s: encoding.progressive_level_mask(s, num_levels=6, start_levels=2, update_every=10,
                                                              start_step=100))
  np.testing.assert_array_equal(mask_fn(jnp.int32(step)), expected)


def test_progressive_level_mask_rejects_a_negative_start_step():
  with pytest.raises(ValueError, match="start_step must be >= 0, got -1"):
    encoding.progressive_level_mask(0, num_levels=6, start_levels=2, update_every=10, start_step=-1)


# ------------------------------------------------------- positional encoding


def test_positional_encoding_hand_computed():
  x = jnp.array([[0.25, -0.5]])
  r = math.sqrt(0.5)
  # [x, sin(pi x), cos(pi x), sin(2 pi x), cos(2 pi x)], each 2 wide.
  expected = [[0.25, -0.5, r, -1.0, r, 0.0, 1.0, 0.0, 0.0, -1.0]]
  np.testing.assert_allclose(encoding.positional_encoding(x, 2), expected, atol=1e-6)
  np.testing.assert_allclose(
    encoding.positional_encoding(x, 2, include_input=False),
    [expected[0][2:]],
    atol=1e-6,
  )
  assert encoding.positional_encoding_dim(2, 2) == 10
  assert encoding.positional_encoding_dim(3, 6, include_input=False) == 36
  assert encoding.positional_encoding(jnp.zeros((4, 5, 3)), 6).shape == (4, 5, 39)


# --------------------------------------------------------------- flax module


def test_module_init_apply_and_level_mask():
  module = encoding.HashGridEncoding(config=SMALL)
  points = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 5, 3)), jnp.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), points)
  tables = params["params"]["tables"]
  assert tables.shape == (4, 2**10, 2)
  # U(-1e-4, 1e-4): bounded, centred, std 1e-4 / sqrt(3).
  assert float(jnp.abs(tables).max()) <= 1e-4
  assert abs(float(tables.std()) - 1e-4 / math.sqrt(3)) < 0.05e-4
  assert abs(float(tables.mean())) < 1e-5

  params = {"params": {"tables": jnp.asarray(TABLES)}}
  apply = jax.jit(module.apply)
  full = apply(params, points)
  assert full.shape == (2, 5, 8)
  np.testing.assert_allclose(full, encode(points, TABLES, SMALL), atol=1e-6)

  masked = apply(params, points, level_mask=jnp.array([1.0, 0.0, 1.0, 0.0]))
  masked, full = np.asarray(masked).reshape(10, 4, 2), np.asarray(full).reshape(10, 4, 2)
  assert np.all(np.abs(full[:, [1, 3]]) > 0)  # so that zero below means masked
  np.testing.assert_array_equal(masked[:, [1, 3]], 0.0)
  np.testing.assert_array_equal(masked[:, [0, 2]], full[:, [0, 2]])


def test_errors_name_the_bad_value():
  with pytest.raises(ValueError, match="max_resolution"):
    encoding.HashGridConfig(base_resolution=32, max_resolution=16)
  with pytest.raises(ValueError, match=r"\(4, 1024, 2\)"):
    encoding.hash_grid_encode(jnp.zeros((1, 3)), jnp.zeros((4, 512, 2)), SMALL)
