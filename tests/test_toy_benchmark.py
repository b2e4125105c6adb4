"""The toy benchmark's bookkeeping: runs, resume, the baseline and the tables.

Training is replaced by a stand-in that saves the run's untrained state as its final
checkpoint, so a run's row (restored from disk, scored) must equal the baseline row
(built from the config directly): two paths to the same field.
"""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import numpy as np
import pytest

from configs import toy
from dreamfusion_jax import files, runs, scene as scene_lib, state as state_lib, toy_benchmark, toy_score
from dreamfusion_jax.checkpoints import Checkpointer

PROMPTS = ["a yellow cone", "a green torus"]


def _save_untrained(config, run_dir, *, step=None):
  """Stands in for training: writes config.json and the untrained state as the
  checkpoint of the last step (or of `step`: a run stopped there)."""
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, runs.CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort())
  scene = scene_lib.build_scene(config)
  tx = state_lib.make_optimizer(config.optim, config.train.steps)
  init_key, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  checkpointer = Checkpointer(os.path.join(run_dir, runs.CHECKPOINT_DIR), max_to_keep=1)
  checkpointer.save(config.train.steps if step is None else step, state_lib.create_train_state(scene, tx, init_key))
  checkpointer.wait()
  checkpointer.close()
  _save_untrained.calls += 1


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bench"))
  _save_untrained.calls = 0
  result = toy_benchmark.run_benchmark(toy.get_config("quick"), workdir, prompts=PROMPTS, seeds=[0],
                                       train_fn=_save_untrained, log=lambda _: None)
  return workdir, result


def test_a_run_row_is_its_restored_field_scored(bench):
  _, result = bench
  assert [r["prompt"] for r in result["runs"]] == PROMPTS == [r["prompt"] for r in result["baseline"]]
  for run, base in zip(result["runs"], result["baseline"]):
    assert run["step"] == 0 and base["step"] == 0 and not run["resumed"]
    for key in ("silhouette_iou", "volume_iou", "centre_opacity_above", "color_distance"):
      assert run[key] == pytest.approx(base[key], abs=1e-6), key


def test_each_run_leaves_the_views_it_was_scored_on(bench):
  workdir, _ = bench
  image = iio.imread(os.path.join(workdir, toy_benchmark.run_name(PROMPTS[1], 0), toy_benchmark.VIEWS_FILE))
  assert image.shape == (9 * 64, 8 * 64, 3)
  # Row 9 starts with the result's view from above, then the torus's truth: a ring round a hole.
  truth_top = image[8 * 64:, 64:128, 0].astype(float) / 255
  assert truth_top[30:34, 30:34].mean() < 0.1 and truth_top[32, 32 + 14] > 0.9


def test_scored_runs_are_skipped_and_another_config_is_refused(bench):
  workdir, result = bench
  calls = _save_untrained.calls
  again = [toy_benchmark.run_one(toy.get_config("quick"), workdir, p, 0, train_fn=_save_untrained, log=lambda _: None)
           for p in PROMPTS]
  assert _save_untrained.calls == calls  # nothing trained
  assert again == result["runs"]
  other = toy.get_config("quick")
  other.train.steps = 7
  with pytest.raises(toy_benchmark.WorkdirError, match="another config"):
    toy_benchmark.run_one(other, workdir, PROMPTS[0], 0, train_fn=_save_untrained, log=lambda _: None)


def test_a_stopped_run_is_not_scored_and_stops_the_benchmark(tmp_path):
  # train.train_and_evaluate returns normally when SIGTERM stops it; the benchmark must
  # not take that checkpoint for the finished run.
  stopped = lambda config, run_dir: _save_untrained(config, run_dir, step=config.train.steps // 2)
  with pytest.raises(toy_benchmark.RunStopped, match="rerun"):
    toy_benchmark.run_benchmark(toy.get_config("quick"), str(tmp_path), prompts=PROMPTS, seeds=[0],
                                train_fn=stopped, log=lambda _: None)
  started = sorted(n for n in os.listdir(tmp_path) if n != toy_benchmark.LOCK_FILE)
  assert started == [toy_benchmark.run_name(PROMPTS[0], 0)]  # the next run never started
  assert not os.path.exists(os.path.join(tmp_path, toy_benchmark.run_name(PROMPTS[0], 0), toy_benchmark.RESULT_FILE))


def test_a_second_benchmark_process_in_one_workdir_is_refused(tmp_path):
  # Two processes in one workdir would train the same run at once (seen: a run scored
  # at step 240 of 400). The lock is the kernel's, so it is held by another process here.
  lock = os.path.join(tmp_path, toy_benchmark.LOCK_FILE)
  holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                             f"fd = os.open({lock!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                             "os.write(fd, str(os.getpid()).encode()); print('held', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(toy_benchmark.WorkdirError, match=f"in use by another process \\(pid {holder.pid}"):
      toy_benchmark.run_benchmark(toy.get_config("quick"), str(tmp_path), prompts=PROMPTS, seeds=[0],
                                  train_fn=_save_untrained, log=lambda _: None)
  finally:
    holder.kill()
    holder.wait()
  assert sorted(os.listdir(tmp_path)) == [toy_benchmark.LOCK_FILE]  # nothing started
  with files.exclusive_lock(lock, "again"):  # the dead holder left no stale lock
    pass


def test_a_row_of_an_older_yardstick_is_scored_again_without_training(bench):
  workdir, result = bench
  path = os.path.join(workdir, toy_benchmark.run_name(PROMPTS[0], 0), toy_benchmark.RESULT_FILE)
  with open(path) as f:
    row = json.load(f)
  old = {k: v for k, v in row.items() if "any_yaw" not in k and k not in ("yardstick_version", "yaw_deg_by_shape")}
  with open(path, "w") as f:
    json.dump(old, f)
  calls, lines = _save_untrained.calls, []
  again = toy_benchmark.run_one(toy.get_config("quick"), workdir, PROMPTS[0], 0, train_fn=_save_untrained,
                                log=lines.append)
  assert _save_untrained.calls == calls  # nothing trained
  assert "scoring again" in lines[0]
  assert again == json.loads(json.dumps(result["runs"][0]))  # the same run, the same scores, the same record
  with open(path) as f:
    assert json.load(f)["yardstick_version"] == toy_score.VERSION


def test_bad_prompt_fails_before_anything_is_trained(tmp_path):
  with pytest.raises(ValueError, match="a red dog"):
    toy_benchmark.run_benchmark(toy.get_config("quick"), str(tmp_path), prompts=["a green torus", "a red dog"],
                                seeds=[0], train_fn=_save_untrained)
  assert os.listdir(tmp_path) == []


def _row(prompt, shape, sil, vol_margin, sil_margin, above, right, any_yaw_margin=None):
  any_yaw_margin = vol_margin if any_yaw_margin is None else any_yaw_margin
  return {"prompt": prompt, "prompt_shape": shape, "seed": 0, "silhouette_iou": sil, "silhouette_margin": sil_margin,
          "volume_iou": sil, "volume_margin": vol_margin, "centre_opacity_above": above, "color_distance": 0.1,
          "volume_iou_any_yaw": sil, "volume_margin_any_yaw": any_yaw_margin,
          "right_color": right, "has_hole": above < toy_score.HOLE_OPACITY, "best_volume_shape": shape,
          "color": "red"}


def test_summary_counts_and_statistics_by_hand():
  rows = [_row("a red torus", "torus", 0.9, 0.10, 0.01, 0.2, True),
          _row("a red cube", "cube", 0.5, 0.03, 0.06, 1.0, True, any_yaw_margin=0.2),
          _row("a blue torus", "torus", 0.7, -0.2, -0.1, 0.9, False)]
  s = toy_benchmark.summarise(rows)
  assert s["num_runs"] == 3
  assert s["silhouette_iou_mean"] == pytest.approx(0.7) and s["silhouette_iou_min"] == 0.5
  assert s["volume_margin_mean"] == pytest.approx(-0.07 / 3) and s["volume_margin_min"] == -0.2
  assert (s["own_shape_best_volume"], s["volume_margin_at_least"], s["silhouette_margin_at_least"]) == (2, 1, 1)
  assert (s["own_shape_best_volume_any_yaw"], s["volume_margin_any_yaw_at_least"]) == (2, 2)
  assert (s["right_color"], s["torus_runs"], s["torus_with_hole"]) == (2, 2, 1)


def test_tables_hold_every_row_and_the_summary(bench):
  workdir, result = bench
  md_path, json_path = toy_benchmark.write_tables(result, workdir)
  with open(json_path) as f:
    assert json.load(f)["runs"] == json.loads(json.dumps(result["runs"]))
  with open(md_path) as f:
    text = f.read()
  tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
  assert len(tables) == 2
  runs_table, summary = tables
  header = [c.strip() for c in runs_table[0].strip("|").split("|")]
  assert header[:4] == ["row", "prompt", "seed", "sil IoU"] and header[-1] == "train wall s"
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in runs_table[2:]]
  assert [(c[0], c[1]) for c in cells] == [("run", p) for p in PROMPTS] + [("baseline", p) for p in PROMPTS]
  assert all(len(c) == len(header) for c in cells)
  assert cells[0][3] == f"{result['runs'][0]['silhouette_iou']:.3f}" and cells[2][-1] == "-"
  summary_cells = [[c.strip() for c in line.strip("|").split("|")] for line in summary[2:]]
  assert [c[0] for c in summary_cells] == ["runs", "baseline"]
  n_hole = result["summary"]["runs"]["torus_with_hole"]
  assert summary_cells[0][-1] == f"{n_hole}/1"
  np.testing.assert_allclose(float(summary_cells[1][2]), result["summary"]["baseline"]["silhouette_iou_mean"],
                             atol=1e-3)
