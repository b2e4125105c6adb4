"""The suite runs with the XLA CPU flags the scripts use (dreamfusion_jax.cli), set here
before any test starts JAX's backend; subprocesses inherit them.

It also shares one persistent compilation cache, new for each session of the suite and
removed after it: many tests (and the scripts they run as subprocesses) compile the same
train steps, and XLA's CPU compiles of them take tens of seconds. A cached executable is
the same program, so no result depends on it.
"""

import atexit
import os
import shutil
import tempfile

import jax

from dreamfusion_jax import cli

cli.apply_cpu_xla_flags()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="dreamfusion_jax_tests_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE  # subprocesses (the scripts) share it
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
