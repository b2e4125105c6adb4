"""Outcome test of text-to-3D with Gaussians on the embedded toy prior (issue 17, e):
configs/toy_gaussians.py on the two prompts the NeRF outcome test uses must beat the
untrained pool (DreamGaussian's start) on the 3D scores of toy_score.py."""

import pytest

from configs import toy_gaussians
from dreamfusion_jax import toy_benchmark, toy_prior, toy_score

PROMPTS = ["a yellow cone", "a green torus"]
TRAINED = PROMPTS  # 200 steps: about 20 s each on 2 CPU cores

# The same prompts as tests/test_toy_e2e.py (chosen there before any result). Each
# comment: the untrained pool's number (seed 0; computed and checked below) and the
# 32-run table's seed-0 run with the shipped prior v2 (2 CPU cores, 2026-12-03;
# docs/gaussians.md; seed 1 in brackets). The thresholds sit about half-way between
# the pool and the lower of the two seeds. The pool is a ball: at the mesh threshold 0.5
# its occupancy is the solid ball its renders show, so its volume IoU is not 0.
# ("min", key, value): score >= value; ("max", key, value): score <= value.
THRESHOLDS = {
    "a yellow cone": [
        ("min", "volume_iou", 0.46),  # pool 0.361, run 0.564 [0.599]
        ("min", "volume_margin", 0.10),  # pool -0.499 (the sphere's is higher), run +0.262 [+0.279]
        ("min", "silhouette_margin", 0.15),  # pool -0.430 (a ball), run +0.280 [+0.314]
        ("max", "color_distance", 0.35),  # pool 0.637 (grey), run 0.153 [0.181]
    ],
    "a green torus": [
        ("min", "volume_iou", 0.62),  # pool 0.462, run 0.793 [0.814]
        ("min", "volume_margin", 0.17),  # pool -0.398, run +0.385 [+0.379]
        ("min", "silhouette_margin", 0.08),  # pool -0.242, run +0.206 [+0.220]
        ("max", "color_distance", 0.30),  # pool 0.504, run 0.068 [0.075]
        ("max", "centre_opacity_above", 0.5),  # the hole: pool 0.994, run 0.217 [0.005] (ground truth 0.07)
    ],
}


@pytest.fixture(scope="module")
def baseline():
  return {r["prompt"]: r for r in toy_benchmark.baseline_rows(toy_gaussians.get_config(), PROMPTS, [0])}


@pytest.fixture(scope="module")
def text_to_3d(tmp_path_factory):
  toy_prior.load()  # fails here when the shipped prior is missing
  workdir = str(tmp_path_factory.mktemp("toy_gaussians"))
  return {text: toy_benchmark.run_one(toy_gaussians.get_config(), workdir, text, 0) for text in TRAINED}


@pytest.mark.parametrize("text", PROMPTS)
def test_the_untrained_pool_fails_every_threshold(baseline, text):
  score = baseline[text]
  failures = toy_score.threshold_failures(score, THRESHOLDS[text])
  assert len(failures) == len(THRESHOLDS[text]), toy_score.summary_line(score)


@pytest.mark.slow
@pytest.mark.parametrize("text", TRAINED)
def test_text_to_3d_with_gaussians_passes_every_threshold(text_to_3d, text):
  score = text_to_3d[text]
  failures = toy_score.threshold_failures(score, THRESHOLDS[text])
  assert not failures, (failures, toy_score.summary_line(score))
  assert score["right_color"] and score["best_volume_shape"] == score["prompt_shape"], toy_score.summary_line(score)
