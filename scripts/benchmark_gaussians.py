"""Times the Gaussian rasterizer against the number of Gaussians and the resolution.

  python scripts/benchmark_gaussians.py
  python scripts/benchmark_gaussians.py --num_gaussians=1000,4000,16000 --resolutions=32,64,128 --capacity=256,1024

See dreamfusion_jax/benchmark/gaussians.py for what is timed, docs/gaussians.md for results.
"""

import jax
from absl import app, flags

from dreamfusion_jax import cli
from dreamfusion_jax.benchmark import gaussians

_NUM = flags.DEFINE_list("num_gaussians", ["1000", "4000", "16000"], "Pool sizes.")
_RES = flags.DEFINE_list("resolutions", ["32", "64", "128"], "Square image sizes in pixels.")
_TILE = flags.DEFINE_integer("tile_size", 16, "Tile side in pixels.")
_CAPACITY = flags.DEFINE_list("capacity", ["256"], "Gaussians kept per tile (several: one row each).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per case (median reported).")


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  _, table = gaussians.cost_table([int(n) for n in _NUM.value], [int(r) for r in _RES.value],
                                  tile_size=_TILE.value, capacities=[int(k) for k in _CAPACITY.value], repeats=_REPEATS.value)
  print(table)


if __name__ == "__main__":
  cli.apply_cpu_xla_flags()
  app.run(main)
