"""Outcome tests of the shipped toy prior: its samples, and text-to-3D through it.

These judge the trained weights in dreamfusion_jax/assets/toy_prior by what they do:
a prompt must produce the prompt's colour in 2D samples, and an optimised NeRF whose
silhouettes match the prompt's shape (and not another shape) and whose colour is the
prompt's colour.
"""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import numpy as np
import pytest
import trimesh

from configs import toy
from dreamfusion_jax import runs, toy_prior, toy_world, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unfinished_prior_reason():
  """Why the outcome tests cannot judge the shipped weights yet, or None.

  The prior trains over several sessions (scripts/train_prior.py resumes); until the
  shipped weights have reached their planned steps they are an intermediate
  checkpoint, committed so training can continue, not a prior to judge.
  """
  state_file = toy_prior.PRIOR_DIR / toy_prior.TRAINING_STATE
  if not (toy_prior.PRIOR_DIR / "model_index.json").exists():
    return "the toy prior is not shipped in this checkout"
  state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "target_steps": "?"}
  if state["target_steps"] == "?" or state["step"] < state["target_steps"]:
    return (f"the shipped toy prior is an intermediate checkpoint (step {state['step']} of "
            f"{state['target_steps']}): its outcome is judged once training finishes")
  return None


shipped = pytest.mark.skipif(not (toy_prior.PRIOR_DIR / "model_index.json").exists(),
                             reason="the toy prior is not shipped in this checkout")
finished = pytest.mark.skipif(_unfinished_prior_reason() is not None, reason=str(_unfinished_prior_reason()))


@pytest.fixture(scope="module")
def prior():
  return toy_prior.load()


@shipped
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


@shipped
def test_shipped_prior_denoises_better_with_the_right_colour(prior, fresh_views):
  guidance, params = prior
  gaps = toy_prior.conditioning_gaps(guidance, params, *fresh_views)
  print(gaps)
  # Paired noise: with the prompt of another colour the epsilon MSE rises by more than
  # 1% of the unconditional MSE (3% at step 1677), and the right prompt beats "".
  assert gaps["color"] > 0.01, gaps
  assert gaps["text"] > 0.0, gaps


@finished
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


PROMPTS = ["a red cube", "a blue sphere"]


@pytest.fixture(scope="module")
def text_to_3d(tmp_path_factory):
  scores = {}
  for text in PROMPTS:
    config = toy.get_config()
    config.prompt = text
    config.train.render_video = config.train.export_mesh = False  # the README-command test covers them
    workdir = str(tmp_path_factory.mktemp(text.replace(" ", "_")))
    train.train_and_evaluate(config, workdir)
    _, scene, params, step = runs.restore_scene(workdir)
    scores[text] = toy_world.score_scene(scene, params, text, level_mask=scene.level_mask(step))
    print(text, scores[text])
  return scores


@finished
@pytest.mark.slow
@pytest.mark.parametrize("text", PROMPTS)
def test_text_to_3d_matches_the_prompt(text_to_3d, text):
  score = text_to_3d[text]
  assert score["iou"] >= 0.6, score
  assert score["color"] == score["prompt_color"], score


@finished
@pytest.mark.slow
def test_a_wrong_prompt_scores_worse(text_to_3d):
  cube, sphere = text_to_3d["a red cube"], text_to_3d["a blue sphere"]
  assert cube["iou_by_shape"]["cube"] > cube["iou_by_shape"]["sphere"]
  assert sphere["iou_by_shape"]["sphere"] > sphere["iou_by_shape"]["cube"]


@shipped
@pytest.mark.slow
def test_readme_command_leaves_renders_a_video_and_a_mesh(tmp_path):
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
  # scripts/score_toy.py reports the run's IoU per shape and its colour.
  scored = subprocess.run([sys.executable, "scripts/score_toy.py", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert scored.returncode == 0, scored.stderr[-3000:]
  _, scene, params, step = runs.restore_scene(str(tmp_path))
  score = toy_world.score_scene(scene, params, "a red cube", level_mask=scene.level_mask(step))
  assert f"IoU(cube)={score['iou']:.3f}" in scored.stdout, scored.stdout
  assert f"colour={score['color']} (prompt red)" in scored.stdout, scored.stdout
