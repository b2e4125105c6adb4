"""Command-line boundary shared by the scripts: flag errors as one line.

absl prints a flag it cannot parse as two lines, and an override of a config field that
does not exist (`--config.no_such_key=1`) as a 20-line traceback out of ml_collections.
`parse_flags` turns both into one line naming the flag, exit status 2 (a usage error).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags


def _bad_override(argv: Sequence[str], name: str) -> str:
  """The --config.* argument whose path mentions `name`, else a generic label."""
  for arg in argv[1:]:
    if arg.startswith("--config.") and name in arg.split("=", 1)[0].split("."):
      return arg
  return f"--config.{name}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`app.run(main, flags_parser=cli.parse_flags)`: absl's parsing, one-line errors."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\n")
  except (AttributeError, KeyError) as e:  # ml_collections: the override names no field
    name = str(e).strip("\"' ")
    sys.stderr.write(f"error: {_bad_override(argv, name)}: the config has no field {name!r} "
                     f"(see the config file for the fields there are)\n")
  except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
    sys.stderr.write(f"error: {str(e).strip().splitlines()[0]}\n")
  sys.exit(2)


# XLA CPU flags the project runs with by default (docs/performance.md: with YNNPACK's
# reductions the hash grid's corner sums run 5-30x slower; every row of the scaling
# table and the prior's training step are faster without them, the UNet and VAE rows
# unchanged). Verified on jaxlib 0.10; XLA aborts on a flag it does not know, so other
# versions get none. The flag only changes how the CPU backend compiles.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce",)
_CPU_XLA_FLAGS_JAXLIB = "0.10."


def apply_cpu_xla_flags(environ=None) -> list[str]:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS, each unless the user set that flag already.

  Call before JAX first uses a device (XLA reads XLA_FLAGS when its backend starts, not
  at import). Returns the flags added.
  """
  import os

  import jaxlib

  environ = os.environ if environ is None else environ
  if not jaxlib.__version__.startswith(_CPU_XLA_FLAGS_JAXLIB):
    return []
  current = environ.get("XLA_FLAGS", "")
  added = [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in current]
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
