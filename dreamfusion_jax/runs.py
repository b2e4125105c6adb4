"""A run as a whole: building one from a config, and reading one back from its workdir.

`setup_run` is the one place that turns a config into the pieces of a train step
(guidance, prompt embeddings, scene, optimiser, initial state); the training loop, the
benchmark and the tests all call it. `load_config` / `restore_scene` read a finished or
running workdir for export and scoring, without importing the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections

from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax import state as state_lib
from dreamfusion_jax.guidance import prompts as prompts_lib

Array = jax.Array
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class RunParts:
  """Everything a train step needs, built once from a config.

  Attributes:
    guidance, guidance_params: the frozen 2D prior and its weights.
    embeddings: PromptEmbeddings of the config's prompt per view bucket.
    scene: the scene (field + background + render settings).
    tx: the optax optimiser.
    state: the initial TrainState (step 0).
    base_key: the run's key; step k draws from fold_in(base_key, k).
  """

  config: ml_collections.ConfigDict
  guidance: Any
  guidance_params: Any
  embeddings: prompts_lib.PromptEmbeddings
  scene: scene_lib.Scene
  tx: Any
  state: state_lib.TrainState
  base_key: Array


def setup_run(config: ml_collections.ConfigDict, *, guidance_and_params=None) -> RunParts:
  """Builds a run's parts from `config`.

  Args:
    config: a full experiment config (configs/dreamfusion.py).
    guidance_and_params: an already loaded (guidance, params); default: load
      `config.guidance` with `guidance.from_config` (the prior first, so a missing
      model fails before anything compiles).
  """
  if guidance_and_params is None:
    from dreamfusion_jax import guidance as guidance_lib  # loads diffusers: only when a run is built

    guidance_and_params = guidance_lib.from_config(config.guidance)
  guidance, gparams = guidance_and_params
  embeddings = prompts_lib.make_prompt_embeddings(guidance, gparams, config.prompt, config.guidance.negative_prompt,
                                                  config.guidance.view_dependent)
  scene = scene_lib.build_scene(config)
  tx = state_lib.make_optimizer(config.optim, config.train.steps)
  init_key, base_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state = state_lib.create_train_state(scene, tx, init_key)
  return RunParts(config=config, guidance=guidance, guidance_params=gparams, embeddings=embeddings, scene=scene,
                  tx=tx, state=state, base_key=base_key)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to `workdir/config.json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the --workdir of a training run?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_scene(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, scene_lib.Scene,
                                                                     dict, int]:
  """Scene and parameters of a run's checkpoint (the latest unless `step` is given).

  Returns:
    (config, scene, params, step).
  """
  from dreamfusion_jax.checkpoints import Checkpointer

  config = load_config(workdir)
  scene = scene_lib.build_scene(config)
  tx = state_lib.make_optimizer(config.optim, config.train.steps)
  template = jax.eval_shape(lambda: state_lib.create_train_state(scene, tx, jax.random.PRNGKey(0)))
  checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.train.keep_checkpoints)
  steps = checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {checkpointer.directory}")
  if step is not None and step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {checkpointer.directory}; available: {sorted(steps)}")
  state = checkpointer.restore(template, step)
  checkpointer.close()
  return config, scene, state.params, int(state.step)
