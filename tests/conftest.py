"""The suite runs with the XLA CPU flags the scripts use (dreamfusion_jax.cli), set here
before any test starts JAX's backend; subprocesses inherit them.

The scripts the tests run as subprocesses share one persistent compilation cache, new
for each session of the suite and removed after it: many of them compile the same train
steps, and XLA's CPU compiles of them take tens of seconds. A cached executable is the
same program, so no result depends on it. The suite's own process does not write to it:
there, with jaxlib 0.10.2, serializing one executable for the cache aborted the whole
process (SIGABRT in `executable.serialize()`, twice at the same test, once on an idle machine)
after a few hundred tests had compiled theirs; a fresh process writes the same
executable without trouble.
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
jax.config.update("jax_compilation_cache_dir", None)  # read when jax was imported above: off here
