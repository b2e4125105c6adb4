"""Old runs keep working: the step-0 workdirs (a NeRF, the Gaussians, VSD and
image-to-3D, written before the seams refactor; tests/fixtures/step0/README.md)
restore for scoring and export, and resume and continue training with their flags."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dreamfusion_jax import runs
from step0 import FIXTURES, fill, train

OLD_RUNS = sorted(p.name for p in (FIXTURES / "workdirs").iterdir())


def test_every_kind_of_old_run_is_here():
  assert OLD_RUNS == ["gaussians", "image_to_3d", "nerf", "vsd"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", OLD_RUNS)
def test_old_run_resumes_and_restores(kind, tmp_path):
  workdir = tmp_path / kind
  shutil.copytree(FIXTURES / "workdirs" / kind, workdir)
  flags = json.loads((workdir / "flags.json").read_text())
  # Written by a checkout elsewhere: its embedded prior's absolute path is not this one's.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["guidance"]["model"].endswith(("dreamfusion_jax/assets/toy_prior", "dreamfusion_jax/assets/toy_zero123"))
  saved["guidance"]["model"] = "/a/checkout/that/moved/dreamfusion_jax/assets/" + saved["guidance"]["model"].split("/")[-1]
  (workdir / "config.json").write_text(json.dumps(saved))
  # The run's own config: it restores for scoring and export as written.
  config, _, params, step = runs.restore_scene(str(workdir))
  assert os.path.isdir(config.guidance.model)  # the upgrade found this checkout's prior
  assert config.guidance.prior == ("zero123" if kind == "image_to_3d" else "stable_diffusion")
  assert step == 4 and config.train.steps == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
  # And it continues training from step 4 with its own flags.
  result = train(fill(flags) + ["--config.train.steps=6"], workdir)
  assert "resumed from" in result.stdout
  steps = [json.loads(l)["step"] for l in open(workdir / "metrics.jsonl")]
  assert steps == [2, 4, 6]
  _, _, _, step = runs.restore_scene(str(workdir))
  assert step == 6
