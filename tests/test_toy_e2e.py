"""Outcome tests of the shipped toy prior: its samples, and text-to-3D through it.

These judge the trained weights in dreamfusion_jax/assets/toy_prior by what they do:
a prompt must produce the prompt's colour in 2D samples, and text-to-3D on prompts the
toy config was not tuned on must beat the untrained density blob by a clear margin on
the 3D scores of toy_score.py. A missing or unfinished prior fails these tests; it
never skips them.
"""

import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import numpy as np
import pytest
import trimesh

from configs import toy
from dreamfusion_jax import runs, toy_benchmark, toy_prior, toy_score, toy_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prior():
  reason = toy_prior.unfinished_reason(toy_prior.PRIOR_DIR, "toy prior")
  if reason is not None:
    pytest.fail(reason)
  return toy_prior.load()


def test_shipped_prior_is_small_and_loads(prior):
  guidance, _ = prior
  assert guidance.vae is None  # pixel space
  size = sum(f.stat().st_size for f in toy_prior.PRIOR_DIR.rglob("*") if f.is_file())
  assert size <= 20 * 2**20


@pytest.fixture(scope="module")
def fresh_views():
  # Views the prior never saw (another seed than its data set), 2 per object.
  data = toy_prior.render_dataset(seed=123, per_object=2, chunk=32)
  return data["images"], data["object"]


def test_shipped_prior_denoises_better_with_the_right_colour(prior, fresh_views):
  guidance, params = prior
  gaps = toy_prior.conditioning_gaps(guidance, params, *fresh_views)
  print(gaps)
  # Paired noise: with the prompt of another colour the epsilon MSE rises by more than
  # 1% of the unconditional MSE (3% at step 1677), and the right prompt beats "".
  assert gaps["color"] > 0.01, gaps
  assert gaps["text"] > 0.0, gaps


@pytest.mark.parametrize("color", toy_world.COLOR_NAMES)
def test_samples_have_the_prompt_colour(prior, color):
  guidance, params = prior
  prompts = [toy_world.prompt(shape, color) for shape in toy_world.SHAPES]
  # Guidance 7.5 (Stable Diffusion's usual): 54 of 64 samples (4 seeds) take the prompt's
  # colour at the step-3000 prior, against 35 of 64 at guidance 3.
  samples = toy_prior.sample_images(guidance, params, prompts, jax.random.PRNGKey(0), guidance_scale=7.5)
  # The object sits in the middle of the frame; the background is a random colour.
  centre = samples[:, 12:20, 12:20].reshape(len(prompts), -1, 3)
  nearest = [toy_world.closest_color(np.median(c, axis=0)) for c in centre]
  assert nearest.count(color) >= 3, (color, nearest)


# Chosen before any result of them was seen: the two shapes and the two colours that
# configs/toy.py was not tuned on ("a red cube" and "a blue sphere" were), and the two
# shapes whose 3D features (a cone's point and base, a torus's hole) side views miss.
PROMPTS = ["a yellow cone", "a green torus"]

# Thresholds of the 3D scores (toy_score.score_arrays). Each comment gives the untrained
# blob's number (step 0, seed 0: the baseline row, also computed and checked below), the
# shipped prior v2's (a 400-step run of configs/toy.py, seed 0, on this 2-core CPU,
# 2026-11-25) and, in brackets, v1's (step 3000) under the config of its day.
# ("min", key, value): score >= value; ("max", key, value): score <= value.
THRESHOLDS = {
    "a yellow cone": [
        ("min", "volume_iou", 0.35),  # blob 0.000 (fog below the occupancy density), v2 0.610 [v1 0.313]
        ("min", "volume_margin", 0.15),  # blob 0.000 (empty against every shape), v2 +0.297 [+0.138]
        ("min", "silhouette_margin", 0.15),  # blob -0.143 (the sphere's 0.715 beats the cone's 0.573), v2 +0.288 [+0.297]
        ("max", "color_distance", 0.35),  # blob 0.638 (grey 0.5), v2 0.205 (mean (1.00, 1.00, 0.10)) [0.238]
    ],
    "a green torus": [
        ("min", "volume_iou", 0.45),  # blob 0.000, v2 0.621 [0.639]
        ("min", "volume_margin", 0.15),  # blob 0.000, v2 +0.329 over the sphere's 0.292 [+0.231]
        ("min", "silhouette_margin", 0.10),  # blob +0.000 (torus 0.716, sphere 0.715), v2 +0.248 [+0.175]
        # The blob's grey is nearest to green, so the nearest-colour check cannot tell them apart
        # here; the distance does: blob 0.502, v2 0.190 (mean (0.00, 0.78, 0.11)) [v1 0.390, a
        # saturated (0.00, 1.00, 0.00)].
        ("max", "color_distance", 0.35),
    ],
}


@pytest.fixture(scope="module")
def baseline():
  """The untrained start of each prompt's run scored against the prompt (the blob)."""
  return {r["prompt"]: r for r in toy_benchmark.baseline_rows(toy.get_config(), PROMPTS, [0])}


@pytest.fixture(scope="module")
def text_to_3d(prior, tmp_path_factory):
  del prior  # fails here when the shipped prior is missing or unfinished
  workdir = str(tmp_path_factory.mktemp("toy_bench"))
  # The benchmark's own run: configs/toy.py with the prompt and seed set, no video or mesh.
  return {text: toy_benchmark.run_one(toy.get_config(), workdir, text, 0) for text in PROMPTS}


@pytest.mark.parametrize("text", PROMPTS)
def test_the_untrained_blob_fails_every_threshold(baseline, text):
  score = baseline[text]
  failures = toy_score.threshold_failures(score, THRESHOLDS[text])
  assert len(failures) == len(THRESHOLDS[text]), toy_score.summary_line(score)
  if text == "a yellow cone":
    assert not score["right_color"]


@pytest.mark.slow
@pytest.mark.parametrize("text", PROMPTS)
def test_text_to_3d_passes_every_threshold(text_to_3d, text):
  score = text_to_3d[text]
  failures = toy_score.threshold_failures(score, THRESHOLDS[text])
  assert not failures, (failures, toy_score.summary_line(score))
  assert score["right_color"] and score["best_volume_shape"] == score["prompt_shape"], toy_score.summary_line(score)


@pytest.mark.slow
def test_the_torus_has_its_hole(text_to_3d):
  # Ground truth 0.07, the blob 0.94; the step-3000 prior made a lens (1.00), prior v2 (views
  # up to 90 degrees) a ring (0.00 on the H100).
  score = text_to_3d["a green torus"]
  assert score["centre_opacity_above"] < toy_score.HOLE_OPACITY, toy_score.summary_line(score)


@pytest.mark.slow
def test_readme_command_leaves_renders_a_video_and_a_mesh(prior, tmp_path):
  del prior  # fails first when the shipped prior is missing or unfinished
  # The README's first command (configs/toy.py), shortened by its "quick" variant, with
  # the end-of-run video and mesh that the full config writes.
  steps = toy.get_config("quick").train.steps
  result = subprocess.run(
      [sys.executable, "scripts/train.py", "--config=configs/toy.py:quick", "--config.prompt=a red cube",
       "--config.train.render_video=True", "--config.train.export_mesh=True", "--config.train.mesh_resolution=64",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert os.path.exists(tmp_path / "renders" / f"step_{steps:06d}.png")
  videos = tmp_path / "videos" / f"step_{steps:06d}"
  assert os.path.getsize(videos / "turntable.mp4") > 1000
  frames = iio.imread(videos / "turntable.gif")
  assert frames.shape[0] == 120 and frames.std() > 1.0  # a turn of non-blank frames
  mesh_path = tmp_path / "export" / f"mesh_{steps:06d}.glb"
  assert f"mesh: {mesh_path}" in result.stdout
  mesh = trimesh.load(mesh_path, force="mesh")
  assert len(mesh.faces) > 100
  # The object the prior shaped sits at the centre, inside the bounding sphere.
  lo, hi = mesh.bounds
  bound = toy.get_config().render.bound
  assert np.all(np.abs((lo + hi) / 2) < 0.2 * bound), mesh.bounds
  assert np.linalg.norm(mesh.vertices, axis=-1).max() <= bound + 1e-3
  assert np.all(hi - lo > 0.3 * bound), mesh.bounds
  # scripts/score_toy.py prints the 3D scores of toy_score for the run.
  scored = subprocess.run([sys.executable, "scripts/score_toy.py", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert scored.returncode == 0, scored.stderr[-3000:]
  _, scene, params, step = runs.restore_scene(str(tmp_path))
  score = toy_score.score_scene(scene, params, "a red cube", level_mask=scene.level_mask(step))
  assert f"{tmp_path} step {steps} {toy_score.summary_line(score)}" in scored.stdout, scored.stdout
