"""No behaviour change in training: 20-step, seed-0 runs of the toy configs (NeRF,
Gaussians, VSD, image-to-3D) and of the tiny SD with CSD and Perp-Neg log the step-0
fixtures' metrics, step by step (tests/fixtures/step0/README.md)."""

import json

import numpy as np
import pytest

from dreamfusion_jax.guidance import tiny
from step0 import FIXTURES, fill, train

TRAJECTORIES = json.loads((FIXTURES / "trajectories.json").read_text())


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  return str(tiny.build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd"), seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAJECTORIES["runs"]))
def test_trajectory_equals_step0(name, tiny_sd, tmp_path):
  run = TRAJECTORIES["runs"][name]
  train(fill(run["flags"], tiny_sd) + TRAJECTORIES["flags"], tmp_path)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [r["step"] for r in run["metrics"]] == list(range(1, 21))
  for got, want in zip(rows, run["metrics"]):
    assert set(want) <= set(got), f"{name}: metrics missing: {set(want) - set(got)}"
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=f"{name} step {want['step']} {key}")
