"""Renders the untrained field of a config (the density blob) to a PNG grid.

  python scripts/render_untrained.py --config=configs/dreamfusion.py --out=untrained.png
"""

from absl import app, flags
from ml_collections import config_flags

from dreamfusion_jax import visualize

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dreamfusion.py", "Experiment config.")
_OUT = flags.DEFINE_string("out", "untrained.png", "Where to write the PNG.")


def main(argv):
  del argv
  path = visualize.save_untrained_render(_CONFIG.value, _OUT.value)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
