"""Outcome test of image-to-3D with the shipped view-conditioned toy prior.

One rendered view of a toy object in, a 3D object out, scored in 3D against the
object's ground truth (toy_score.py) with thresholds the untrained density blob fails.
The object and its view were chosen before any result of them was seen: a cube (the
shape text-to-3D gets wrong, whose yaw only the input view can fix) from a view no
issue names and no training image has (the prior's views are continuous random
draws). With the shipped early prior the thresholds ask for the object's silhouettes
from 32 views, a solid volume and its colour; not yet its shape class. The
same case with 3D Gaussians (configs/toy_zero123.py:gaussians) against the untrained
pool. A missing or unfinished prior fails these tests; it never skips them.
"""


import pytest

from configs import toy_zero123 as toy_zero123_config
from dreamfusion_jax import toy_benchmark, toy_prior, toy_score, toy_zero123

PROMPT = "a blue cube"
VIEW = {"elevation_deg": 30.0, "azimuth_deg": 40.0}

# ("min", key, value): score >= value; ("max", key, value): score <= value. Each comment:
# the untrained blob's number (step 0, seed 0; checked below), then the run of the shipped
# prior (text-prior start, step 2000; this config, seed 0, on this 2-core CPU, 2026-12-03;
# docs/image_to_3d.md). Each threshold lies about half-way between them.
THRESHOLDS = [
    ("min", "silhouette_iou", 0.74),  # blob 0.618 (a ball), run 0.873
    ("min", "volume_iou", 0.38),  # blob 0.000 (fog below the occupancy density), run 0.764
    ("max", "color_distance", 0.30),  # blob 0.574 (grey, nearest green), run 0.049 (0.13, 0.20, 0.86)
]
# Not asked, because the shipped prior does not do it: the cube's own shape beating the
# others (the run's volume IoU is 0.764 against the sphere's 0.884: margin -0.120). The
# view fixes the cube's yaw; the prior does not yet know cubes from spheres from a new
# view. docs/image_to_3d.md has the table.


# The same object and view with 3D Gaussians (configs/toy_zero123.py:gaussians). Each
# comment: the untrained pool's number (seed 0; checked below; DreamGaussian's start is a
# grey ball, solid at the mesh threshold), then the run's, seed 0 [seed 1] (shipped prior:
# text-prior start, step 2000; 2-core CPU, 2026-12-03; docs/image_to_3d.md). Half-way
# between the pool and the lower seed. Not asked: the cube's class (volume margin -0.013
# [-0.017], the sphere's IoU still higher).
GAUSSIAN_THRESHOLDS = [
    ("min", "silhouette_iou", 0.85),  # pool 0.823, run 0.889 [0.882]
    ("min", "silhouette_margin", -0.06),  # pool -0.137 (a ball), run +0.017 [+0.011]
    ("min", "volume_margin", -0.08),  # pool -0.143, run -0.013 [-0.017]
    ("max", "color_distance", 0.35),  # pool 0.575 (grey, nearest green), run 0.123 [0.120]
]


def config(variant=""):
  c = toy_zero123_config.get_config(variant)
  for k, v in VIEW.items():
    c.reference[k] = v
  return c


@pytest.fixture(scope="module")
def prior():
  reason = toy_prior.unfinished_reason(toy_zero123.PRIOR_DIR, "view-conditioned toy prior")
  if reason is not None:
    pytest.fail(reason)
  return toy_zero123.load()


def test_shipped_priors_fit_the_size_cap(prior):
  guidance, _ = prior
  assert guidance.vae is None  # pixel space
  from dreamfusion_jax import toy_prior  # pylint: disable=g-import-not-at-top

  size = sum(f.stat().st_size for d in (toy_prior.PRIOR_DIR, toy_zero123.PRIOR_DIR) for f in d.rglob("*")
             if f.is_file())
  assert size <= 20 * 2**20


def test_the_untrained_blob_fails_every_threshold():
  score = toy_benchmark.baseline_rows(config(), [PROMPT], [0])[0]
  failures = toy_score.threshold_failures(score, THRESHOLDS)
  assert len(failures) == len(THRESHOLDS), toy_score.summary_line(score)
  assert not score["right_color"]


@pytest.mark.slow
def test_image_to_3d_passes_every_threshold(prior, tmp_path):
  del prior  # fails first when the shipped prior is missing or unfinished
  # The benchmark's own run: it renders the input view into the run directory.
  score = toy_benchmark.run_one(config(), str(tmp_path), PROMPT, 0)
  failures = toy_score.threshold_failures(score, THRESHOLDS)
  assert not failures, (failures, toy_score.summary_line(score))
  assert score["right_color"], toy_score.summary_line(score)


def test_the_untrained_gaussian_pool_fails_every_threshold():
  score = toy_benchmark.baseline_rows(config("gaussians"), [PROMPT], [0])[0]
  failures = toy_score.threshold_failures(score, GAUSSIAN_THRESHOLDS)
  assert len(failures) == len(GAUSSIAN_THRESHOLDS), toy_score.summary_line(score)
  assert not score["right_color"]


@pytest.mark.slow
def test_image_to_3d_with_gaussians_passes_every_threshold(prior, tmp_path):
  del prior
  score = toy_benchmark.run_one(config("gaussians"), str(tmp_path), PROMPT, 0)
  failures = toy_score.threshold_failures(score, GAUSSIAN_THRESHOLDS)
  assert not failures, (failures, toy_score.summary_line(score))
  assert score["right_color"], toy_score.summary_line(score)
