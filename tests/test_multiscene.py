"""Many scenes in one job (dreamfusion_jax/multiscene.py): scene k of a job equals the
single-scene run of its config, with the scene axis split over 2 devices; refusals.

The job runs in a subprocess with 2 forced CPU devices (4 scenes, 2 per device); the
reference single-scene runs run here, on 1 device, through train.train_and_evaluate.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import dreamfusion
from dreamfusion_jax import errors, multiscene, runs, train
from dreamfusion_jax.guidance import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, prompt, seed, lr, guidance scale, opacity weight): every scene field differs
# from the first scene in at least one scene.
SCENES = [("s0", "a red cube", 0, 1e-2, 7.5, 0.0), ("s1", "a blue sphere", 0, 1e-2, 7.5, 0.0),
          ("s2", "a red cube", 3, 1e-2, 20.0, 0.0), ("s3", "a green torus", 1, 5e-3, 7.5, 50.0)]


def scene_config(model, prompt, seed, lr, scale, opacity):
  c = dreamfusion.get_config("tiny")
  c.guidance.model, c.prompt, c.seed, c.optim.lr = model, prompt, seed, lr
  c.guidance.guidance_scale, c.loss.opacity_weight = scale, opacity
  return c


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  return str(tiny.build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="module")
def job(tiny_sd, tmp_path_factory):
  """The 4-scene job on 2 devices (a subprocess: the device count is fixed at JAX start)."""
  workdir = str(tmp_path_factory.mktemp("job"))
  code = textwrap.dedent(f"""
      import jax
      from dreamfusion_jax import cli
      cli.apply_cpu_xla_flags()
      from configs import dreamfusion
      from dreamfusion_jax import multiscene
      assert jax.local_device_count() == 2, jax.devices()
      scenes = {SCENES!r}
      configs = []
      for name, prompt, seed, lr, scale, opacity in scenes:
        c = dreamfusion.get_config("tiny")
        c.guidance.model, c.prompt, c.seed, c.optim.lr = {tiny_sd!r}, prompt, seed, lr
        c.guidance.guidance_scale, c.loss.opacity_weight = scale, opacity
        configs.append(c)
      multiscene.train_scenes(configs, {workdir!r}, [s[0] for s in scenes])
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "4 scenes in one job on 2 device(s), 2 per device" in result.stdout + result.stderr
  return workdir


def flat(params):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(params)])


def test_scene_k_equals_its_single_scene_run(job, tiny_sd, tmp_path):
  """Tolerances, as for the device-count tests (test_multihost.py): with Adam (eps
  1e-15) a parameter with a non-zero gradient moves by ~lr per step whatever the
  gradient's size, so where a gradient nearly cancels, a reassociated (vmapped) sum
  can change an update by a fraction of lr or flip it. Scene k run with another scene's key, prompt or learning rate would
  move most parameters differently by ~lr from the first step on."""
  for name, prompt, seed, lr, scale, opacity in SCENES:
    config = scene_config(tiny_sd, prompt, seed, lr, scale, opacity)
    train.train_and_evaluate(config, str(tmp_path / name))
    _, _, single, single_step = runs.restore_scene(str(tmp_path / name))
    _, _, scene_k, scene_step = runs.restore_scene(os.path.join(job, name))
    assert scene_step == single_step == config.train.steps
    start = flat(runs.setup_run(config).state.params)
    single, scene_k = flat(single), flat(scene_k)
    diff, change = np.abs(scene_k - single), np.abs(single - start)
    print(f"{name}: max |difference| {diff.max():.3g}, mean {diff.mean():.3g}; mean change {change.mean():.3g}; "
          f"{np.mean(diff > 0):.2%} of the parameters differ at all")
    assert change.mean() > lr / 10  # it trained
    assert diff.mean() < 0.01 * change.mean(), name
    assert np.mean(diff > lr / 10) < 0.01, name  # seen: 1 of 8655 parameters (Adam near a zero gradient)
    assert diff.max() < 6 * lr, name  # 6 steps of at most ~lr each


def test_each_scene_is_an_ordinary_run(job):
  for name, prompt, seed, lr, scale, opacity in SCENES:
    workdir = os.path.join(job, name)
    config = runs.load_config(workdir)
    assert (config.prompt, config.seed, config.optim.lr) == (prompt, seed, lr)
    assert (config.guidance.guidance_scale, config.loss.opacity_weight) == (scale, opacity)
    assert os.path.exists(os.path.join(workdir, "renders", "step_000006.png"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      steps = [json.loads(line)["step"] for line in f if '"step"' in line]
    assert steps and steps[-1] == 6


def test_scenes_that_differ_in_a_compiled_setting_are_refused(tiny_sd, tmp_path):
  a = scene_config(tiny_sd, "a red cube", 0, 1e-2, 7.5, 0.0)
  b = scene_config(tiny_sd, "a red cube", 1, 1e-2, 7.5, 0.0)
  b.loss.opacity_warmup_steps = 5
  with pytest.raises(errors.InputError, match=r"these differ too: loss\.opacity_warmup_steps"):
    multiscene.train_scenes([a, b], str(tmp_path / "job"), ["a", "b"])
  assert not os.path.exists(tmp_path / "job")


def test_differing_fields():
  a, b = dreamfusion.get_config("tiny"), dreamfusion.get_config("tiny")
  b.prompt, b.optim.lr, b.render.num_samples = "x", 1.0, 3
  assert multiscene.differing_fields([a, b]) == ["optim.lr", "prompt", "render.num_samples"]


def test_scene_values_hold_the_numeric_fields_that_differ():
  configs = [dreamfusion.get_config("tiny") for _ in range(3)]
  configs[1].optim.lr = configs[0].optim.lr / 4
  configs[2].loss.opacity_weight = 3.0
  configs[2].prompt = "x"
  values = multiscene.scene_values(configs)
  assert sorted(values) == ["lr_scale", "opacity"]
  np.testing.assert_array_equal(values["lr_scale"], [1.0, 0.25, 1.0])
  np.testing.assert_array_equal(values["opacity"], [configs[0].loss.opacity_weight] * 2 + [3.0])
  assert multiscene.scene_values(configs[:1]) == {}


@pytest.mark.parametrize("scenes,devices,expected", [(4, 4, 4), (2, 4, 2), (3, 4, 3), (5, 4, 1), (8, 4, 4),
                                                      (6, 4, 3), (1, 4, 1)])
def test_scene_devices_is_the_largest_divisor(scenes, devices, expected):
  assert len(multiscene.scene_devices(scenes, list(range(devices)))) == expected


def test_sweep_script_trains_a_seed_sweep_as_one_job(tiny_sd, tmp_path):
  cmd = [sys.executable, "scripts/sweep.py", "--config=configs/dreamfusion.py:tiny", f"--workdir={tmp_path}",
         "--sweep=seed=0,1", "--set=prompt=a red cube", f"--set=guidance.model={tiny_sd}",
         "--set=train.render_video=false", "--set=train.export_mesh=false"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "[job 1/1] 2 scenes in one job: seed=0; seed=1" in result.stdout
  for seed in (0, 1):
    _, _, _, step = runs.restore_scene(str(tmp_path / f"seed={seed}"))
    assert step == 6
    assert runs.load_config(str(tmp_path / f"seed={seed}")).seed == seed


def test_sweep_script_bad_override_is_one_line(tmp_path):
  cmd = [sys.executable, "scripts/sweep.py", "--config=configs/dreamfusion.py:tiny", f"--workdir={tmp_path / 'w'}",
         "--sweep=prompt=a,b", "--set=seed=x"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "error: seed=x: not a valid int" in result.stdout
  assert "Traceback" not in result.stdout + result.stderr
  assert not os.path.exists(tmp_path / "w")
