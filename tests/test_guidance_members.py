"""The 2D seam's promise: a new method or a new prior is one module and nothing else.

Each test writes a member that exists only in the test (in a package of its own on
PYTHONPATH, named by its dotted path) and trains it through scripts/train.py with no
other edit:
- a method with its own residual (half SDS's) and its own trained state (a scalar
  pulled to 1 by its extra loss), text-to-3D and image-to-3D, stopped after its first
  checkpoint and resumed: bit-exact against the uninterrupted run;
- a prior whose noise prediction says "every clean image is this colour", which turns
  a toy run's renders that colour.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax import cameras, render, runs, scene as scene_lib
from dreamfusion_jax.guidance import methods, priors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(REPO, "tests", "fixtures", "step0", "input_green_cone.png")

HALF_SDS = '''
"""Half of SDS's residual, and a state of its own: one scalar that its extra loss pulls to 1."""
import jax.numpy as jnp

from dreamfusion_jax.guidance import conditioning, diffusion


def init_state(params, key, settings):
  return {"w": jnp.zeros((), jnp.float32)}


def state_learning_rate(settings):
  return 0.1


def residual(prior, params, latents, cond, t, noise, *, scale, settings, state, c2w):
  noisy = diffusion.add_noise(params["alphas_cumprod"], latents, noise, t)
  return 0.5 * (conditioning.guided_noise(prior, params, noisy, t, cond, scale) - noise)


def extra_losses(prior, params, state, latents, cond, *, key, c2w, settings):
  return {"half_state_loss": (state["w"] - 1.0) ** 2}
'''

# A pixel-space "prior" that knows one image: every clean image is RED. Its noise
# prediction under any conditioning is the eps that makes x0_hat that colour, so SDS's
# gradient pulls every render towards it.
RED_PRIOR = '''
"""A prior that believes every image is one colour (a test of the prior contract)."""
import dataclasses

import jax.numpy as jnp

from dreamfusion_jax.guidance import diffusion
from dreamfusion_jax.guidance.settings import settings_from_config

CONDITIONS_ON = "text"
COLOR = (1.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class OneColourPrior:
  settings: object
  num_train_timesteps: int = 1000
  latent_channels: int = 3
  pixel_space: bool = True

  @property
  def latent_size(self):
    return self.settings.image_size

  def encode(self, params, images, key=None):
    size = self.settings.image_size
    images = jnp.asarray(images)
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear")
    return images * 2.0 - 1.0

  def decode(self, params, latents):
    return jnp.clip(latents * 0.5 + 0.5, 0.0, 1.0)

  def encode_prompts(self, params, prompts):
    return jnp.zeros((len(prompts), 1, 4), jnp.float32)

  def noise_predictions(self, params, noisy, t, branches):
    abar = params["alphas_cumprod"][t][:, None, None, None]
    x0 = jnp.asarray(COLOR, jnp.float32) * 2.0 - 1.0
    eps = (noisy - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
    return [eps for _ in branches]


def from_config(cfg, **kwargs):
  table = diffusion.ddpm_alphas_cumprod(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000)
  return OneColourPrior(settings=settings_from_config(cfg)), {"alphas_cumprod": jnp.asarray(table)}
'''.replace("import jax.numpy as jnp\n", "import jax\nimport jax.numpy as jnp\n", 1)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
  """A package `extra_members` with the two test-only members, outside the repo."""
  root = tmp_path_factory.mktemp("members")
  (root / "extra_members").mkdir()
  (root / "extra_members" / "__init__.py").write_text("")
  (root / "extra_members" / "half_sds.py").write_text(textwrap.dedent(HALF_SDS))
  (root / "extra_members" / "one_colour.py").write_text(textwrap.dedent(RED_PRIOR))
  sys.path.insert(0, str(root))  # restore_scene in this process builds the method's state template
  yield str(root)
  sys.path.remove(str(root))


def train(members, workdir, *flags):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([members, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "scripts/train.py", f"--workdir={workdir}", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def test_the_members_are_found_by_name_or_dotted_path(members):
  assert set(methods.names()) == {"sds", "csd", "ism", "vsd"}
  assert set(priors.names()) == {"stable_diffusion", "zero123"}
  assert methods.exists("extra_members.half_sds") and priors.exists("extra_members.one_colour")
  assert not methods.exists("extra_members.nowhere") and not methods.exists("sdss")
  with pytest.raises(ValueError, match="config.guidance.method='sdss'"):
    methods.get("sdss")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "image"])
def test_a_new_method_is_one_module_and_resumes_bit_exactly(kind, members, tmp_path):
  flags = (["--config=configs/toy.py:quick"] if kind == "text" else
           ["--config=configs/toy_zero123.py:quick", f"--config.image={IMAGE}", "--config.prompt=a green cone"])
  flags += ["--config.guidance.method=extra_members.half_sds", "--config.train.steps=4", "--config.train.ckpt_every=2",
            "--config.train.eval_every=4", "--config.train.log_every=1"]
  whole, stopped = tmp_path / "whole", tmp_path / "stopped"
  train(members, whole, *flags)
  # A stop after the first checkpoint: the run's workdir as it was then.
  shutil.copytree(whole, stopped)
  shutil.rmtree(stopped / "checkpoints" / "4")
  assert "resumed from" in train(members, stopped, *flags).stdout
  _, _, a, step_a = runs.restore_scene(str(whole))
  _, _, b, step_b = runs.restore_scene(str(stopped))
  assert step_a == step_b == 4
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The method's own state trained with the scene: its loss pulled w from 0 towards 1.
  assert 0.05 < float(a["guidance"]["w"]) < 1.0
  rows = [json.loads(l) for l in open(whole / "metrics.jsonl")]
  assert rows[-1]["half_state_loss"] < rows[0]["half_state_loss"] <= 1.0


def mean_albedo(scene, params):
  """The opacity-weighted mean albedo of 8 views around a scene: (3,)."""
  params = jax.tree_util.tree_map(jnp.asarray, params)
  n = 8
  cams = cameras.orbit_cameras(n, elevation_deg=15.0, radius=1.7, fovy_deg=45.0)
  out = scene_lib.render_views(scene, params, cams, height=32, width=32, keys=None,
                               light_positions=cams.positions, shading=jnp.full((n,), render.ALBEDO, jnp.int32),
                               solid_background=jnp.zeros((n, 3)), use_solid_background=jnp.ones((n,), bool))
  # Over black, a pixel's colour is albedo x opacity.
  return np.asarray(out["rgb"]).sum((0, 1, 2)) / max(float(np.asarray(out["opacity"]).sum()), 1e-6)


@pytest.mark.slow
def test_a_new_prior_is_one_module_and_pulls_renders_to_its_colour(members, tmp_path):
  flags = ["--config.guidance.prior=extra_members.one_colour", "--config.prompt=anything", "--config.train.steps=60",
           "--config.train.ckpt_every=60", "--config.train.eval_every=60", "--config.train.log_every=20"]
  train(members, tmp_path, "--config=configs/toy.py:quick", *flags)
  config, scene, params, _ = runs.restore_scene(str(tmp_path))
  start = runs.setup_run(config).state.params  # the untrained start, through the same prior
  red, grey = mean_albedo(scene, params), mean_albedo(scene, start)
  assert red[0] - max(red[1], red[2]) > 0.5, red  # red, against green and blue
  assert abs(grey[0] - max(grey[1], grey[2])) < 0.2, grey  # the start was not
