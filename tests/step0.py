"""Shared by the step-0 tests (test_step0_*.py): where the fixtures of the seams
refactor live and how their runs are made. tests/fixtures/step0/README.md says what
they are; they were written once, before the refactor, and are never regenerated."""

import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "step0"
IMAGE = FIXTURES / "input_green_cone.png"
# float32 round-off: the same program gives the same bits; a reordered sum may not.
RTOL, ATOL = 2e-5, 1e-6


def assert_close(got, want, what):
  np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=what)


def fill(flags, tiny_sd=""):
  """A fixture's flags with this checkout's input image and tiny model."""
  return [f.format(image=IMAGE, tiny_sd=tiny_sd) for f in flags]


def train(flags, workdir):
  cmd = [sys.executable, "scripts/train.py", f"--workdir={workdir}", *flags]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result
