"""The SDS family end to end: each guidance.method trains a few steps through the
ordinary train loop on the tiny random SD and on the toy config (the gradients
themselves are checked against independent computations in test_stable_diffusion.py).
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import dreamfusion, toy
from dreamfusion_jax import runs, train
from dreamfusion_jax.guidance import tiny


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  return str(tiny.build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd")))


def _check_trained(config, workdir):
  start = runs.setup_run(config).state.params
  _, _, params, step = runs.restore_scene(workdir)
  assert step == config.train.steps
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(start)))
  assert moved > 1e-4
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"sds_grad_norm"' in line]
  assert rows and all(np.isfinite(r["loss"]) and r["sds_grad_norm"] > 0 and r["skipped"] == 0 for r in rows)


@pytest.mark.parametrize("method", ["csd", "ism"])
def test_method_trains_on_the_tiny_sd(method, tiny_sd, tmp_path):
  config = dreamfusion.get_config("tiny")
  config.guidance.model, config.prompt, config.guidance.method = tiny_sd, "a red cube", method
  config.train.steps, config.train.log_every = 4, 1
  train.train_and_evaluate(config, str(tmp_path))
  _check_trained(config, str(tmp_path))


@pytest.mark.parametrize("method", ["csd", "ism"])
def test_method_trains_on_the_toy_config(method, tmp_path):
  config = toy.get_config("quick")
  config.guidance.method = method
  config.train.steps = config.train.log_every = config.train.eval_every = config.train.ckpt_every = 3
  train.train_and_evaluate(config, str(tmp_path))
  _check_trained(config, str(tmp_path))


def test_perp_neg_trains_on_the_tiny_sd_and_the_toy_config(tiny_sd, tmp_path):
  config = dreamfusion.get_config("tiny")
  config.guidance.model, config.prompt, config.guidance.perp_neg = tiny_sd, "a red cube", True
  config.train.steps, config.train.log_every = 4, 1
  train.train_and_evaluate(config, str(tmp_path / "tiny"))
  _check_trained(config, str(tmp_path / "tiny"))
  config = toy.get_config("perp_neg")
  config.train.steps = config.train.log_every = config.train.eval_every = config.train.ckpt_every = 3
  config.train.render_video = config.train.export_mesh = False
  train.train_and_evaluate(config, str(tmp_path / "toy"))
  _check_trained(config, str(tmp_path / "toy"))
