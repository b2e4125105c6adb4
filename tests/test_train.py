"""Training system: the CLI end to end, bit-exact resume, signals, config errors,
device-count independence of the update, and the non-finite guard.

Runs the real pipeline on a tiny random Stable Diffusion written to a temporary
directory (no network). The CLI runs are subprocesses, so each pays JAX start-up and
compilation (~40 s); they are marked slow.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dreamfusion
from dreamfusion_jax import checkpoints, runs, state as state_lib, train
from dreamfusion_jax.guidance import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Longer than the tiny variant's 6 steps so that a kill can land between checkpoints.
RUN_FLAGS = ["--config=configs/dreamfusion.py:tiny", "--config.train.steps=12", "--config.train.ckpt_every=3",
             "--config.train.eval_every=6", "--config.prompt=a red cube"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  return str(tiny.build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd")))


def run_train(workdir, model, *extra, wait=True):
  cmd = [sys.executable, "scripts/train.py", f"--workdir={workdir}", *RUN_FLAGS,
         f"--config.guidance.model={model}", *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def final_params(workdir):
  _, _, params, step = runs.restore_scene(str(workdir))
  return params, step


def assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def full_run(tiny_sd, tmp_path_factory):
  """One uninterrupted 12-step run: the reference for the resume tests."""
  workdir = tmp_path_factory.mktemp("full")
  result = run_train(workdir, tiny_sd)
  assert result.returncode == 0, result.stdout + result.stderr
  return workdir


@pytest.mark.slow
def test_cli_runs_end_to_end(full_run):
  workdir = full_run
  metrics = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
  assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in metrics)
  assert all(m["num_skipped"] == 0 for m in metrics)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "6", "9"]  # the last 3 kept
  assert sorted(os.listdir(workdir / "renders")) == ["step_000006.png", "step_000012.png"]
  assert json.load(open(workdir / "config.json"))["prompt"] == "a red cube"
  events = [f for f in os.listdir(workdir / "tensorboard") if f.startswith("events")]
  assert events
  # The validation grids go to TensorBoard's image tab too: the "renders" tag with PNGs.
  data = b"".join(open(workdir / "tensorboard" / f, "rb").read() for f in events)
  assert data.count(b"renders") >= 2 and data.count(b"\x89PNG") >= 2
  # The parameters moved away from their initialisation.
  config, scene, params, step = runs.restore_scene(str(workdir))
  assert step == 12
  init = scene.init(state_lib.init_key(config.seed))
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                         jax.tree_util.tree_leaves(init))]
  assert max(moved) > 1e-3


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(full_run, tiny_sd, tmp_path):
  proc = run_train(tmp_path, tiny_sd, wait=False)
  ckpt = tmp_path / "checkpoints" / "3"
  deadline = time.time() + 300
  while not (ckpt / "commit_success.txt").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  killed_at = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=3).latest_step()
  assert killed_at is not None and killed_at < 12, f"the run was not interrupted (latest checkpoint {killed_at})"

  result = run_train(tmp_path, tiny_sd)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "resumed from" in result.stdout
  resumed, step = final_params(tmp_path)
  reference, _ = final_params(full_run)
  assert step == 12
  assert_trees_equal(resumed, reference)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tiny_sd, tmp_path):
  proc = run_train(tmp_path, tiny_sd, "--config.train.steps=1000", "--config.train.ckpt_every=500", wait=False)
  deadline = time.time() + 300
  metrics = tmp_path / "metrics.jsonl"
  while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:  # first logged step
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "stopped by signal" in out
  step = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=3).latest_step()
  assert step is not None and 2 <= step < 500  # saved where it stopped, not at a ckpt_every multiple


@pytest.mark.parametrize(
    "flag,message",
    [("--config.optim.lrr=1e-2", "lrr"),
     ("--config.train.steps=many", "steps"),
     ("--config.guidance.t_min=0.99", "t_min=0.99"),
     ("--config.render.shading_probs=(1.0, 0.0)", "shading_probs"),
     ("--config.guidance.model=/nonexistent/sd", "/nonexistent/sd")])
def test_bad_config_is_rejected_with_a_clear_message(flag, message, tmp_path):
  result = subprocess.run([sys.executable, "scripts/train.py", f"--workdir={tmp_path}",
                           "--config=configs/dreamfusion.py:tiny", flag],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_missing_model_error_has_no_traceback(tmp_path):
  result = subprocess.run([sys.executable, "scripts/train.py", f"--workdir={tmp_path}",
                           "--config=configs/dreamfusion.py:tiny", "--config.guidance.model=/nonexistent/sd"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert "Traceback" not in result.stderr
  assert "huggingface-cli download" in result.stderr


def test_validate_config_names_every_problem():
  config = dreamfusion.get_config("tiny")
  config.render.height = 0
  config.optim.lr = -1.0
  config.train.mesh_resolution = 4
  with pytest.raises(train.ConfigError) as e:
    train.validate_config(config)
  assert "config.render.height must be > 0, got 0" in str(e.value)
  assert "config.optim.lr must be > 0, got -1.0" in str(e.value)
  assert "config.train.mesh_resolution must be >= 8, got 4" in str(e.value)
  train.validate_config(dreamfusion.get_config("tiny"))
  train.validate_config(dreamfusion.get_config())


@pytest.fixture(scope="module")
def step_parts(tiny_sd):
  config = dreamfusion.get_config("tiny")
  config.guidance.model = tiny_sd
  config.prompt = "a red cube"
  run = runs.setup_run(config)
  scene, guidance, method, tx, state = run.scene, run.guidance, run.method, run.tx, run.state
  gparams, embeddings = run.guidance_params, run.embeddings
  settings = train.StepSettings.from_config(config, num_devices=1)
  step = jax.jit(lambda s, g, e, k: train.train_step(s, g, e, k, scene=scene, guidance=guidance, method=method,
                                                     settings=settings, tx=tx, axis_name=None))
  return step, state, gparams, embeddings


def test_step_updates_params(step_parts):
  step, state, gparams, embeddings = step_parts
  new_state, metrics = step(state, gparams, embeddings, jax.random.PRNGKey(1))
  assert int(new_state.step) == 1 and int(new_state.num_skipped) == 0
  assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(new_state.params),
                                                            jax.tree_util.tree_leaves(state.params)))
  assert diff > 0


def test_non_finite_step_is_skipped(step_parts):
  step, state, gparams, embeddings = step_parts
  # An infinite weight in the last layer makes densities and the loss non-finite.
  params = jax.tree_util.tree_map(lambda x: x, state.params)
  params["field"]["output"]["kernel"] = params["field"]["output"]["kernel"].at[0, 0].set(jnp.inf)
  bad = state.replace(params=params)
  new_state, metrics = step(bad, gparams, embeddings, jax.random.PRNGKey(1))
  assert float(metrics["skipped"]) == 1.0
  assert int(new_state.num_skipped) == 1 and int(new_state.step) == 1
  assert_trees_equal(new_state.params, bad.params)
  assert_trees_equal(new_state.opt_state, bad.opt_state)


DEVICE_CHECK = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from configs import dreamfusion
    from dreamfusion_jax import runs, train

    assert jax.local_device_count() == 4, jax.devices()
    config = dreamfusion.get_config("tiny")
    config.guidance.model = sys.argv[1]
    config.prompt = "a blue sphere"
    config.train.steps = 10
    parts = runs.setup_run(config)
    guidance, gparams, embeddings = parts.guidance, parts.guidance_params, parts.embeddings
    scene, tx, state = parts.scene, parts.tx, parts.state

    def run(num_devices, batch_size, steps=2):
      config.train.batch_size = batch_size
      devices = jax.local_devices()[:num_devices]
      settings = train.StepSettings.from_config(config, num_devices=num_devices)
      p_step = train.make_pmapped_step(scene, guidance, parts.method, settings, tx, devices=devices)
      s = train.replicate(state, devices)
      args = [train.replicate(x, devices) for x in (gparams, embeddings, jax.random.PRNGKey(7))]
      for _ in range(steps):
        s, metrics = p_step(s, *args)
      return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], (s, metrics)))

    (s4, m4), (s1, m1) = run(4, 1), run(1, 4)
    print("loss", float(m4["loss"]), float(m1["loss"]))
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    worst = 0.0
    for a, b, c in zip(*(jax.tree_util.tree_leaves(x) for x in (s4.params, s1.params, state.params))):
      # Float reassociation (pmean vs a batch sum) perturbs Adam's update by ~1e-6; a wrong
      # split of the randomness would differ by the size of the update itself (~lr).
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
      worst = max(worst, float(np.max(np.abs(a - b))))
    moved = max(float(np.max(np.abs(b - c))) for b, c in zip(jax.tree_util.tree_leaves(s1.params),
                                                             jax.tree_util.tree_leaves(state.params)))
    print(f"max param difference {worst:.3g}, max param change {moved:.3g}")
    assert moved > 1e-3
    print("EQUIVALENT")
""")


@pytest.mark.slow
def test_four_devices_match_one_device_with_four_times_the_batch(tiny_sd):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", DEVICE_CHECK, tiny_sd], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert "EQUIVALENT" in result.stdout, result.stdout + result.stderr
