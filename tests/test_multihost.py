"""Multi-host training for real: two JAX processes x two CPU devices each (gloo
collectives over localhost), launched as a user would launch one process per host.

  * 2 processes x 2 devices reach the parameters of 1 process x 4 devices (same global
    batch), to float reassociation: the cross-process mean (gloo) sums the four device
    gradients in another order than the in-process one.
  * Checkpoints are written once for the job and restored by every process.
  * SIGKILL of one process: the other exits within a bounded time with one line, and a
    restart of both resumes to the parameters of an uninterrupted 2-process run.

Each job pays JAX start-up and compilation in every process (~40 s on 2 cores).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dreamfusion_jax import runs
from dreamfusion_jax.guidance import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
PEER_TIMEOUT_S = 10
FLAGS = ["--config=configs/dreamfusion.py:tiny", "--config.prompt=a red cube", f"--config.train.steps={STEPS}",
         "--config.train.ckpt_every=3", "--config.train.keep_checkpoints=20", "--config.train.log_every=3",
         f"--config.train.eval_every={STEPS}", f"--config.cluster.peer_timeout_s={PEER_TIMEOUT_S}"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  return str(tiny.build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd")))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, model, *, devices: int, process_id=None, port=None, log=None):
  cmd = [sys.executable, "scripts/train.py", f"--workdir={workdir}", *FLAGS, f"--config.guidance.model={model}"]
  if process_id is not None:
    cmd += ["--config.distributed=True", f"--config.cluster.coordinator_address=127.0.0.1:{port}",
            "--config.cluster.num_processes=2", f"--config.cluster.process_id={process_id}"]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def launch_job(workdir, model, logs_dir):
  port = free_port()
  logs = [open(os.path.join(logs_dir, f"process_{i}.log"), "a") for i in range(2)]
  return [launch(workdir, model, devices=2, process_id=i, port=port, log=logs[i]) for i in range(2)], logs


def finish(procs, logs, timeout=600):
  codes = [p.wait(timeout=timeout) for p in procs]
  for f in logs:
    f.close()
  texts = [open(f.name).read() for f in logs]
  return codes, texts


def params_at(workdir, step):
  _, _, params, restored = runs.restore_scene(str(workdir), step)
  assert restored == step
  return params


def assert_params_close(a, b, **tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.fixture(scope="module")
def two_process_run(tiny_sd, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two_processes")
  procs, logs = launch_job(workdir / "run", tiny_sd, workdir)
  codes, texts = finish(procs, logs)
  assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
  return workdir / "run"


@pytest.fixture(scope="module")
def one_process_run(tiny_sd, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_process")
  with open(workdir / "log.txt", "w") as log:
    proc = launch(workdir / "run", tiny_sd, devices=4, log=log)
    assert proc.wait(timeout=600) == 0, open(workdir / "log.txt").read()[-3000:]
  return workdir / "run"


def test_two_processes_write_one_checkpoint_per_step_and_one_log(two_process_run):
  steps = sorted(int(d) for d in os.listdir(two_process_run / "checkpoints") if d.isdigit())
  assert steps == list(range(3, STEPS + 1, 3))
  # Only process 0 writes metrics: one line per logged step, not one per process.
  with open(two_process_run / "metrics.jsonl") as f:
    logged = [line for line in f if line.strip()]
  assert len(logged) == STEPS // 3


def flat(params) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(params)])


def test_two_processes_match_one_process_with_all_devices(two_process_run, one_process_run):
  """Tolerances: with Adam (eps 1e-15) every parameter with a non-zero gradient moves
  by ~lr = 1e-2 per step whatever the gradient's size, so where the four device
  gradients nearly cancel, a reassociated sum can change an update by a fraction of lr,
  and those differences grow over the run. A wrong split of the global batch or of
  its randomness would move most parameters differently by ~lr from step 1 on."""
  lr = 1e-2
  early_2x2, early_1x4 = flat(params_at(two_process_run, 3)), flat(params_at(one_process_run, 3))
  final_2x2, final_1x4 = flat(params_at(two_process_run, STEPS)), flat(params_at(one_process_run, STEPS))
  diff, change = np.abs(final_2x2 - final_1x4), np.abs(final_1x4 - early_1x4)
  print(f"2x2 vs 1x4: max |difference| {np.max(np.abs(early_2x2 - early_1x4)):.3g} at step 3; at step {STEPS} "
        f"max {diff.max():.3g}, mean {diff.mean():.3g} (mean change since step 3: {change.mean():.3g}), "
        f"{np.mean(diff > lr / 10):.2%} of {diff.size} parameters differ by more than lr/10")
  assert change.mean() > lr  # both runs trained
  np.testing.assert_allclose(early_2x2, early_1x4, rtol=0, atol=lr / 10)
  assert diff.mean() < 0.01 * change.mean()
  assert np.mean(diff > lr / 10) < 0.02


def test_killed_process_stops_the_job_with_one_line_and_a_restart_resumes(tiny_sd, two_process_run, tmp_path):
  workdir = tmp_path / "run"
  procs, logs = launch_job(workdir, tiny_sd, tmp_path)
  deadline = time.time() + 600
  while not (workdir / "checkpoints" / "3").is_dir():
    assert time.time() < deadline and all(p.poll() is None for p in procs), "the job ended before its first checkpoint"
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  codes, texts = finish(procs, logs, timeout=PEER_TIMEOUT_S + 120)
  waited = time.time() - killed_at
  latest = runs_latest_step(workdir)
  print(f"survivor exited {waited:.1f} s after the kill with code {codes[0]}; newest checkpoint {latest}")
  assert codes[0] != 0 and codes[1] == -signal.SIGKILL
  assert waited < PEER_TIMEOUT_S + 60
  assert latest < STEPS, "the job finished before the kill landed: the test proves nothing"
  lines = [l for l in texts[0].replace("\r", "\n").splitlines() if l.strip() and not l.startswith("[Gloo]")]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and ("stopped responding" in errors[0] or "lost contact" in errors[0]), lines[-5:]
  assert "Traceback" not in texts[0] and "F1125" not in texts[0]

  procs, logs = launch_job(workdir, tiny_sd, tmp_path)
  codes, texts = finish(procs, logs)
  assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
  assert f"resumed from {workdir / 'checkpoints'}/{latest}" in texts[0]
  # Same processes, same collectives, same randomness (fold_in(key, step)): bit-exact.
  assert_params_close(params_at(workdir, STEPS), params_at(two_process_run, STEPS), rtol=0, atol=0)


def runs_latest_step(workdir) -> int:
  return max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
