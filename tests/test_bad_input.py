"""Bad input to scripts/train.py: one line naming the bad value, a non-zero exit, and a
workdir left exactly as it was (every file's bytes and mtime), for each case a new user
met (issue: house in order). The resume cases run against a copy of a real finished run.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreamfusion_jax.guidance import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/dreamfusion.py:tiny", "--config.prompt=a red cube"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  return str(tiny.build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd")))


def train(workdir, model, *extra):
  cmd = [sys.executable, "scripts/train.py", f"--workdir={workdir}", *FLAGS, f"--config.guidance.model={model}",
         *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def snapshot(path) -> dict:
  """{relative path: (sha1 of the bytes, mtime)} of every file under `path` (or of the
  file itself); {} when nothing is there."""
  if os.path.isfile(path):
    return {".": (hashlib.sha1(open(path, "rb").read()).hexdigest(), os.stat(path).st_mtime_ns)}
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = (hashlib.sha1(open(full, "rb").read()).hexdigest(),
                                          os.stat(full).st_mtime_ns)
  return out


def assert_one_line_error(result, *needles):
  assert result.returncode != 0, result.stdout + result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def finished_run(tiny_sd, tmp_path_factory):
  """A 6-step run with checkpoints at steps 3 and 6 (4 hash-grid levels)."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  result = train(workdir, tiny_sd, "--config.field.num_levels=4")
  assert result.returncode == 0, result.stdout + result.stderr
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(finished_run, copy)
  return copy


@pytest.mark.parametrize("flag, needles", [
    ("--config.no_such_key=1", ["--config.no_such_key=1", "no field 'no_such_key'"]),
    ("--config.render.no_such_key=1", ["--config.render.no_such_key=1", "no field 'no_such_key'"]),
    ("--config.render.shading_probs=(1.5,0.0,0.0)", ["shading_probs", "(1.5, 0.0, 0.0)"]),
    ("--config.guidance.dtype=float8", ["guidance.dtype", "'float8'"]),
    ("--config.train.steps=many", ["--config.train.steps", "many"]),
    ("--config.guidance.method=vsdd", ["guidance.method", "'vsdd'"]),
])
def test_bad_flag_is_one_line_and_touches_nothing(flag, needles, run_copy, tiny_sd):
  before = snapshot(run_copy)
  assert_one_line_error(train(run_copy, tiny_sd, flag, "--config.field.num_levels=4"), *needles)
  assert snapshot(run_copy) == before


def test_unwritable_workdir_is_one_line(tiny_sd):
  assert_one_line_error(train("/proc/forbidden/run", tiny_sd), "/proc/forbidden/run")
  assert not os.path.exists("/proc/forbidden")


def test_workdir_that_is_a_file_is_one_line(tiny_sd, tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("x")
  before = snapshot(path)
  assert_one_line_error(train(path, tiny_sd), str(path), "is a file")
  assert snapshot(path) == before


def test_resume_with_other_parameter_shapes_names_the_field_and_keeps_the_run(run_copy, tiny_sd):
  before = snapshot(run_copy)
  line = assert_one_line_error(train(run_copy, tiny_sd, "--config.field.num_levels=2"),
                               "field.num_levels: 4 -> 2", "other shapes")
  assert "config.previous.json" not in os.listdir(run_copy), line
  assert snapshot(run_copy) == before


def test_damaged_latest_checkpoint_is_named_and_nothing_is_deleted(run_copy, tiny_sd):
  # Truncate every array data file of the newest checkpoint (as a full disk would).
  data = [os.path.join(root, n) for root, _, names in os.walk(run_copy / "checkpoints" / "6") for n in names
          if os.sep + "d" + os.sep in os.path.join(root, n)]
  assert data
  for path in data:
    with open(path, "r+b") as f:
      f.truncate(max(os.path.getsize(path) // 3, 1))
  before = snapshot(run_copy)
  assert_one_line_error(train(run_copy, tiny_sd, "--config.field.num_levels=4", "--config.train.steps=9"),
                        "checkpoints/6 is damaged", "step 3")
  assert snapshot(run_copy) == before

  # Readers (export, score) fall back to the newest checkpoint that restores, saying so.
  from dreamfusion_jax import checkpoints, runs

  _, _, _, step = runs.restore_scene(str(run_copy))
  assert step == 3
  with pytest.raises(checkpoints.CheckpointError, match="checkpoints/6 cannot be read"):
    runs.restore_scene(str(run_copy), 6)
  assert snapshot(run_copy) == before


def test_resume_with_compatible_changes_continues(run_copy, tiny_sd):
  result = train(run_copy, tiny_sd, "--config.field.num_levels=4", "--config.train.steps=9")
  assert result.returncode == 0, result.stderr
  assert "resumed from" in result.stdout and "differs from this run's config" in result.stdout
  assert sorted(int(s) for s in os.listdir(run_copy / "checkpoints") if s.isdigit())[-1] == 9
  assert os.path.exists(run_copy / "config.previous.json")


def test_bad_image_input_is_one_line_and_creates_nothing(tiny_sd, tmp_path):
  # Image-to-3D (--config.image): a missing file, a text-to-image model, and a file that
  # is not an image (read by the Zero-1-to-3 path, here the shipped toy prior's config).
  not_png = tmp_path / "notes.png"
  not_png.write_text("not an image")
  good = tmp_path / "in.png"
  Image.fromarray(np.full((8, 8, 4), 255, np.uint8)).save(good)
  workdir = tmp_path / "run"
  missing = str(tmp_path / "nowhere.png")
  assert_one_line_error(train(workdir, tiny_sd, f"--config.image={missing}"), missing, "no such file")
  assert_one_line_error(train(workdir, tiny_sd, f"--config.image={good}"), tiny_sd, "text-to-image")
  cmd = [sys.executable, "scripts/train.py", f"--workdir={workdir}", "--config=configs/toy_zero123.py",
         f"--config.image={not_png}"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert_one_line_error(result, str(not_png), "not a readable image")
  assert not workdir.exists()


@pytest.mark.parametrize("extra, needles", [
    ([], ["toy_zero123", "--config.image=PATH"]),  # a Zero-1-to-3 model without an image
    (["--config.guidance.method=csdd"], ["config.guidance.method", "csdd", "sds"]),
    (["--config.guidance.prior=stable_diffusion"], ["is a Zero-1-to-3 checkpoint", "prior='zero123'"]),
    (["--config.guidance.perp_neg=True"], ["perp_neg", "camera itself"]),
    (["--config.reference.object_size=1.5"], ["config.reference.object_size", "[0, 1]", "1.5"]),
])
def test_image_to_3d_config_cases_are_one_line_and_create_nothing(extra, needles, tmp_path):
  image = tmp_path / "in.png"
  Image.fromarray(np.full((16, 16, 4), 255, np.uint8)).save(image)
  workdir = tmp_path / "run"
  flags = [f"--config.image={image}", *extra] if extra else ["--config.image="]
  cmd = [sys.executable, "scripts/train.py", f"--workdir={workdir}", "--config=configs/toy_zero123.py", *flags]
  assert_one_line_error(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600), *needles)
  assert not workdir.exists()
