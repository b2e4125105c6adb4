"""Outcome test of text-to-3D with Gaussians on the embedded toy prior (issue 17, e):
configs/toy_gaussians.py on the two prompts the NeRF outcome test uses must beat the
untrained pool (DreamGaussian's start) on the 3D scores of toy_score.py."""

import pytest

from configs import toy_gaussians
from dreamfusion_jax import toy_benchmark, toy_prior, toy_score

PROMPTS = ["a yellow cone", "a green torus"]
# CI trains only the torus (its shape, colour and hole; CI's 35 minutes): the cone's
# thresholds below hold for the run in docs/gaussians.md and stay checked against the
# untrained pool.
TRAINED = ["a green torus"]

# The same prompts as tests/test_toy_e2e.py (chosen there before any result). Each
# comment: the untrained pool's number (step 0, seed 0; computed and checked below) and
# one 400-step run's with the shipped prior v2 (seed 0, 2 CPU cores, 2026-11-25;
# docs/gaussians.md). Only one seed was run, so the thresholds sit about half-way.
# ("min", key, value): score >= value; ("max", key, value): score <= value.
THRESHOLDS = {
    "a yellow cone": [
        ("min", "volume_iou", 0.28),  # pool 0.003 (opacity 0.1: below the density threshold), run 0.555
        ("min", "volume_margin", 0.14),  # pool -0.003, run +0.284
        ("min", "silhouette_margin", 0.15),  # pool -0.436 (a ball), run +0.297
        ("max", "color_distance", 0.30),  # pool 0.637 (grey), run 0.037
    ],
    "a green torus": [
        ("min", "volume_iou", 0.34),  # pool 0.007, run 0.687
        ("min", "volume_margin", 0.17),  # pool 0.001, run +0.351
        ("min", "silhouette_margin", 0.10),  # pool -0.253, run +0.205
        ("max", "color_distance", 0.30),  # pool 0.504, run 0.114
        ("max", "centre_opacity_above", 0.5),  # the hole: pool 0.998, run 0.000 (ground truth 0.07)
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
