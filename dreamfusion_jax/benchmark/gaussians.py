"""Cost of the Gaussian rasterizer against the number of Gaussians and the resolution.

Each case renders DreamGaussian's starting pool (`pool.init_pool`: N Gaussians uniform
in a ball of radius 0.5, kNN scales, opacity 0.1) from a camera at radius 1.7, fovy
45 (the toy's evaluation view), and times the forward pass and forward + backward
(`value_and_grad` of sum(rgb * c) w.r.t. the pool parameters), each a jitted program
compiled first and timed with `measurement.measure`. The tiles' overflow (Gaussians
dropped from full tiles) of that view is reported beside the time: a case whose
overflow is not 0 renders an approximation.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from dreamfusion_jax import cameras
from dreamfusion_jax.benchmark import measurement, tables
from dreamfusion_jax.gaussians import pool, rasterize


@dataclasses.dataclass(frozen=True)
class RasterCase:
  num_gaussians: int
  resolution: int
  tile_size: int
  capacity: int


def measure_case(case: RasterCase, *, repeats: int) -> dict:
  """Times one case; returns a row dict (times in ms, overflow as counts)."""
  params, stats = pool.init_pool(jax.random.PRNGKey(0), capacity=case.num_gaussians,
                                 num_points=case.num_gaussians, radius=0.5)
  cams = cameras.orbit_cameras(1, elevation_deg=15.0, radius=1.7, fovy_deg=45.0)
  r = case.resolution
  weights = jax.random.uniform(jax.random.PRNGKey(1), (r, r, 3))

  def render(params):
    return rasterize.rasterize(pool.activate(params, stats.active), position=cams.positions[0], c2w=cams.c2w[0],
                               fovy_deg=cams.fovy_deg[0], height=r, width=r, background=jnp.ones(3),
                               tile_size=case.tile_size, capacity=case.capacity)

  def loss(params):
    return jnp.sum(render(params).rgb * weights)

  forward = jax.jit(lambda p: render(p).rgb)
  backward = jax.jit(jax.value_and_grad(loss))
  fwd = measurement.measure("forward", forward, (params,), repeats=repeats)
  bwd = measurement.measure("forward+backward", backward, (params,), repeats=repeats)
  overflow = jax.jit(lambda p: render(p).tile_overflow)(params)
  num_tiles = overflow.shape[0]
  return {"N": case.num_gaussians, "image": f"{r}x{r}", "tiles": num_tiles, "K": case.capacity,
          "fwd ms": fwd.median_s * 1e3, "fwd+bwd ms": bwd.median_s * 1e3,
          "compile s": fwd.compile_s + bwd.compile_s,
          "temp MiB": None if bwd.temp_bytes is None else bwd.temp_bytes / 2**20,
          "dropped": int(overflow.sum()), "full tiles": int((overflow > 0).sum())}


COLUMNS = ("N", "image", "tiles", "K", "fwd ms", "fwd+bwd ms", "compile s", "temp MiB", "dropped", "full tiles")


def cost_table(num_gaussians: Sequence[int], resolutions: Sequence[int], *, tile_size: int = 16,
               capacities: Sequence[int] = (256,), repeats: int = 5) -> tuple[list[dict], str]:
  """Every (N, resolution, capacity) case; returns the rows and a printable table."""
  rows = [measure_case(RasterCase(n, r, tile_size, k), repeats=repeats)
          for n in num_gaussians for r in resolutions for k in capacities]
  return rows, tables.format_table(COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
