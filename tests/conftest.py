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

The README's command runs the suite in two pytest-xdist workers, one test module each
at a time (`-n 2 --dist loadfile`: a module's fixtures are built once). A toy run keeps
about one of the two cores busy (much of a step, and all of XLA's compiling, is one
thread), so two modules at once finish the suite sooner. Each worker has its own cache
(one set by the caller is replaced there), so the two workers' scripts never write one
entry at once.
"""

import atexit
import os
import shutil
import tempfile

import jax

from dreamfusion_jax import cli

cli.apply_cpu_xla_flags()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
  _CACHE = tempfile.mkdtemp(prefix="dreamfusion_jax_tests_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE  # subprocesses (the scripts) share it
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", None)  # read when jax was imported above: off here


# The modules that take minutes, longest first (their durations in a sequential run of
# the suite, 2-core CPU, 2026-12-02). With --no-loadscope-reorder (the README's command)
# the two xdist workers take modules in collection order, so these go first: a long
# module started last would leave one worker idle at the end. (xdist's own order, most
# tests first, puts these few-test modules last.) Order only; every test still runs.
_LONG_MODULES = ("test_step0_residuals.py", "test_step0_trajectories.py", "test_toy_e2e.py", "test_step0_old_runs.py",
                 "test_toy_zero123_e2e.py", "test_sds_family.py", "test_guidance_members.py", "test_multihost.py", "test_image_to_3d.py", "test_multiscene.py", "test_train.py", "test_gaussians_toy.py",
                 "test_gaussians_train.py", "test_bad_input.py", "test_stable_diffusion.py")


def pytest_collection_modifyitems(items):
  rank = lambda item: (_LONG_MODULES.index(item.path.name) if item.path.name in _LONG_MODULES else
                       len(_LONG_MODULES))
  items.sort(key=rank)  # stable: each module's own order is kept
