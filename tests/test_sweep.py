"""Sweep grids of overrides."""

import subprocess
import sys

import pytest

from dreamfusion_jax import sweep


def test_grid_is_the_cartesian_product():
  runs = sweep.grid(["optim.lr=1e-2,5e-3", "guidance.guidance_scale=50,100,20"])
  assert len(runs) == 6
  assert {"optim.lr": "5e-3", "guidance.guidance_scale": "20"} in runs
  assert len({sweep.run_name(r) for r in runs}) == 6


def test_tuple_values_keep_their_commas():
  key, values = sweep.parse_axis("cameras.radius_range=[(1,1.5),(1.5,2)]")
  assert key == "cameras.radius_range" and values == ["(1,1.5)", "(1.5,2)"]


@pytest.mark.parametrize("bad", ["optim.lr", "=1,2", "optim.lr=", "optim.lr=1,,2"])
def test_bad_axes_are_rejected(bad):
  with pytest.raises(ValueError, match="sweep axis|empty value"):
    sweep.parse_axis(bad)


def test_duplicate_keys_are_rejected():
  with pytest.raises(ValueError, match="two sweep axes"):
    sweep.grid(["optim.lr=1,2", "optim.lr=3"])


def test_dry_run_prints_one_command_per_run(tmp_path):
  out = subprocess.run(
      [sys.executable, "scripts/sweep.py", "--config=configs/dreamfusion.py:tiny", f"--workdir={tmp_path}",
       "--sweep=optim.lr=1e-2,5e-3", "--sweep=seed=0,1", "--set=prompt=a red cube", "--dry_run",
       "--separate_jobs"],
      capture_output=True, text=True, check=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("[")]
  assert len(lines) == 4
  assert all("'--config.prompt=a red cube'" in l for l in lines)
  assert any("--config.optim.lr=5e-3" in l and "--config.seed=1" in l and "lr=5e-3,seed=1" in l for l in lines)


def test_runs_that_differ_in_scene_fields_share_a_job(tmp_path):
  out = subprocess.run(
      [sys.executable, "scripts/sweep.py", "--config=configs/dreamfusion.py:tiny", f"--workdir={tmp_path}",
       "--sweep=optim.lr=1e-2,5e-3", "--sweep=render.num_samples=8,16", "--dry_run"],
      capture_output=True, text=True, check=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("[job")]
  assert lines == ["[job 1/2] 2 scenes in one job: lr=1e-2,num_samples=8; lr=5e-3,num_samples=8",
                   "[job 2/2] 2 scenes in one job: lr=1e-2,num_samples=16; lr=5e-3,num_samples=16"]


def test_groups_split_on_the_other_fields():
  grid = sweep.grid(["prompt=a,b", "render.num_samples=8,16", "seed=0,1"])
  jobs = sweep.groups(grid, ("prompt", "seed", "optim.lr"))
  assert [len(j) for j in jobs] == [4, 4]
  assert {r["render.num_samples"] for r in jobs[0]} == {"8"}
  assert {(r["prompt"], r["seed"]) for r in jobs[1]} == {("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")}


def test_overrides_are_parsed_as_the_fields_type():
  from configs import dreamfusion

  config = dreamfusion.get_config("tiny")
  for key, value in [("optim.lr", "5e-3"), ("seed", "3"), ("prompt", "a cat"), ("train.render_video", "false"),
                     ("cameras.radius_range", "(1.0, 2.0)")]:
    sweep.apply_override(config, key, value)
  assert (config.optim.lr, config.seed, config.prompt, config.train.render_video) == (5e-3, 3, "a cat", False)
  assert tuple(config.cameras.radius_range) == (1.0, 2.0)
  with pytest.raises(ValueError, match="no field 'optim.nope'"):
    sweep.apply_override(config, "optim.nope", "1")
  with pytest.raises(ValueError, match="seed=x: not a valid int"):
    sweep.apply_override(config, "seed", "x")


def test_a_scene_config_follows_a_train_steps_override():
  # scripts/sweep.py builds each scene of a job this way: an override of train.steps
  # moves the fields counted in steps (sweep.follow_steps), as --config.train.steps does.
  from configs import toy_gaussians  # pylint: disable=g-import-not-at-top

  base = toy_gaussians.get_config()
  assert base.train.steps == 200 and base.guidance.t_anneal_steps == 200
  config = sweep.scene_config(base, {"train.steps": "37", "prompt": "a red cube"})
  assert config.train.steps == 37 and config.prompt == "a red cube"
  assert config.guidance.t_anneal_steps == config.gaussians.densify_until == 37
  assert config.optim.gaussians.means_decay_steps == 37 and config.gaussians.opacity_reset_every == 370
  assert base.train.steps == 200 and base.guidance.t_anneal_steps == 200  # the base is untouched
