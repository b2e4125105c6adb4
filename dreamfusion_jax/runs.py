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
import pathlib
import sys
from typing import Any, Optional

import jax
import ml_collections

from dreamfusion_jax import errors, files, reference_image
from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax import state as state_lib
from dreamfusion_jax.guidance import methods, priors, prompts as prompts_lib
from dreamfusion_jax.guidance import settings as guidance_settings

Array = jax.Array
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class RunParts:
  """Everything a train step needs, built once from a config.

  Attributes:
    guidance, guidance_params: the frozen 2D prior and its weights.
    method: the distillation method's module (guidance/methods/).
    embeddings: PromptEmbeddings of the config's prompt per view bucket.
    scene: the scene (field + background + render settings).
    tx: the optax optimiser.
    state: the initial TrainState (step 0).
    base_key: the run's key; step k draws from fold_in(base_key, k).
  """

  config: ml_collections.ConfigDict
  guidance: Any
  guidance_params: Any
  method: Any
  embeddings: Any
  scene: scene_lib.Scene
  tx: Any
  state: state_lib.TrainState
  base_key: Array


def setup_run(config: ml_collections.ConfigDict, *, guidance_and_params=None) -> RunParts:
  """Builds a run's parts from `config`.

  Args:
    config: a full experiment config (configs/dreamfusion.py).
    guidance_and_params: an already loaded (prior, params); default: the prior module
      `config.guidance.prior` loads `config.guidance.model` (the prior first, so a
      missing model fails before anything compiles).
  """
  method = methods.get(config.guidance.method)
  if guidance_and_params is None:
    guidance_and_params = priors.get(config.guidance.prior).from_config(config.guidance)
  guidance, gparams = guidance_and_params
  embeddings = make_conditioning(config, guidance, gparams)
  scene = scene_lib.build_scene(config)
  tx = state_lib.make_optimizer(config.optim, config.train.steps, method.state_learning_rate(guidance.settings))
  state = state_lib.create_train_state(
      scene, tx, state_lib.init_key(config.seed),
      method.init_state(gparams, state_lib.guidance_init_key(config.seed), guidance.settings))
  return RunParts(config=config, guidance=guidance, guidance_params=gparams, method=method, embeddings=embeddings,
                  scene=scene, tx=tx, state=state, base_key=state_lib.base_key(config.seed))


def make_conditioning(config: ml_collections.ConfigDict, guidance, gparams):
  """What the guidance conditions on, encoded once: the prompt's embeddings per view
  bucket, or for image-to-3D (config.image) the input image
  (reference_image.ReferenceConditioning)."""
  conditions_on = priors.get(config.guidance.prior).CONDITIONS_ON
  if not config.get("image"):
    if conditions_on == "image":
      raise errors.InputError(f"config.guidance.model={config.guidance.model!r} is an image-conditioned prior "
                              "(Zero-1-to-3): pass the input image, --config.image=PATH")
    return prompts_lib.make_prompt_embeddings(guidance, gparams, config.prompt, config.guidance.negative_prompt,
                                              config.guidance.view_dependent)
  if conditions_on != "image":
    raise errors.InputError(f"--config.image needs an image-conditioned prior (Zero-1-to-3, "
                            f"config.guidance.prior='zero123'): config.guidance.model={config.guidance.model!r} is a "
                            f"text-to-image model")
  r = config.reference
  return reference_image.image_conditioning(guidance, gparams, config.image,
                                            camera=(r.elevation_deg, r.azimuth_deg, r.radius),
                                            render_size=(config.render.height, config.render.width),
                                            object_size=r.object_size)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to `workdir/config.json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the --workdir of a training run?")
  with open(path) as f:
    return ml_collections.ConfigDict(upgrade_config(json.load(f)))


# Renamed values and fields added since a run was written, so that older workdirs still
# restore, export and score (the math of each renamed value is unchanged).
_RENAMED_BLOB_KINDS = {"linear": "magic3d", "gaussian": "dreamfusion"}
_ADDED_FIELDS = {("field", "progressive_start_step"): 0, ("train", "mesh_target_faces"): 0,
                 ("guidance", "sample_posterior"): False, ("guidance", "method"): "sds",
                 ("guidance", "ism_delta_t"): 50, ("guidance", "ism_inv_steps"): 5, ("guidance", "perp_neg"): False,
                 ("guidance", "vsd_lora_rank"): 4, ("guidance", "vsd_lr"): 1e-4,
                 ("guidance", "weight"): 1.0, ("reference", "object_size"): 0.0}
# Where a run was written before config.guidance.prior: Zero-1-to-3 where it had an image.
_PRIOR_OF_OLD_RUNS = {True: "zero123", False: "stable_diffusion"}


def upgrade_config(saved: dict) -> dict:
  """A run's saved config.json (as a dict) in today's field names."""
  field = saved.get("field", {})
  field["blob_kind"] = _RENAMED_BLOB_KINDS.get(field.get("blob_kind"), field.get("blob_kind"))
  if saved.get("guidance", {}).pop("latent_mode", False):
    raise errors.InputError("this run used guidance.latent_mode, which no longer exists")
  saved.setdefault("representation", "nerf")  # runs written before the switch are NeRFs
  # Runs written before image-to-3D are text-to-3D; config.reference is read only when
  # config.image is set, so they need none (its defaults live in configs/dreamfusion.py).
  saved.setdefault("image", "")
  for (section, name), value in _ADDED_FIELDS.items():
    if section in saved:
      saved[section].setdefault(name, value)
  if "guidance" in saved:
    saved["guidance"].setdefault("prior", _PRIOR_OF_OLD_RUNS[bool(saved["image"])])
    saved["guidance"]["model"] = _moved_asset(saved["guidance"].get("model", ""))
  return saved


def _moved_asset(model: str) -> str:
  """An embedded prior's directory as this checkout has it: a run's config holds the
  absolute path of the checkout that wrote it, which may have moved or be another
  machine's; a path that no longer exists and names one of the package's assets
  (".../dreamfusion_jax/assets/<name>") is mapped to this package's copy."""
  path = pathlib.PurePath(model)
  if not path.is_absolute() or os.path.exists(model) or path.parts[-3:-1] != ("dreamfusion_jax", "assets"):
    return model
  here = pathlib.Path(__file__).resolve().parent / "assets" / path.name
  return str(here) if here.is_dir() else model


def check_run_dir(workdir: str, step: Optional[int] = None) -> list[int]:
  """The checkpoint steps of a training run's `workdir`; raises an InputError naming
  what is missing (for `step`, if given). Reads the directory only.
  """
  if not os.path.exists(workdir):
    raise errors.InputError(f"--workdir {workdir!r} does not exist")
  if not os.path.isdir(workdir):
    raise errors.InputError(f"--workdir {workdir!r} is not a directory")
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    raise errors.InputError(f"--workdir {workdir!r} has no {CONFIG_FILE}: is it the --workdir of a training run?")
  checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
  # Orbax names each finished checkpoint by its step; unfinished ones carry a suffix.
  steps = sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()) if os.path.isdir(checkpoint_dir) else []
  if not steps:
    raise errors.InputError(f"--workdir {workdir!r} has no checkpoint in {checkpoint_dir!r}: has the run saved one "
                            f"yet?")
  if step is not None and step not in steps:
    raise errors.InputError(f"no checkpoint for --step={step} in {checkpoint_dir!r}; available: {steps}")
  return steps


def _method_state_shapes(config: ml_collections.ConfigDict, method, settings):
  """key -> the method's own trainable state (VSD's LoRA) built from the model's UNet
  config alone (no weights read), for a checkpoint's template; key -> None for the
  methods without any (no state learning rate)."""
  if method.state_learning_rate(settings) is None:
    return lambda key: None
  from dreamfusion_jax.guidance import pipeline_dir, sd_models  # diffusers: only for a method with state

  root = pipeline_dir.resolve_model_dir(config.guidance.model)
  _, unet_shapes = sd_models.unet_from_config(pipeline_dir.read_json(root / "unet" / "config.json"))
  unet_shapes = unet_shapes.get("params", unet_shapes)
  return lambda key: method.init_state({"unet": unet_shapes}, key, settings)


def restore_scene(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, scene_lib.Scene,
                                                                     dict, int]:
  """Scene and parameters of a run's checkpoint (the latest unless `step` is given).

  Reads only. Where the latest checkpoint cannot be read, the newest one that can is
  used, with a note on stderr naming the damaged steps.

  Returns:
    (config, scene, params, step).
  """
  from dreamfusion_jax import checkpoints

  check_run_dir(workdir, step)
  config = load_config(workdir)
  scene = scene_lib.build_scene(config)
  method, settings = methods.get(config.guidance.method), guidance_settings.settings_from_config(config.guidance)
  tx = state_lib.make_optimizer(config.optim, config.train.steps, method.state_learning_rate(settings))
  init_trainable = _method_state_shapes(config, method, settings)
  key = jax.random.PRNGKey(0)
  template = jax.eval_shape(lambda: state_lib.create_train_state(scene, tx, key, init_trainable(key)))
  checkpointer = checkpoints.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                         max_to_keep=config.train.keep_checkpoints, create=False)
  try:
    if step is not None:
      try:
        state = checkpointer.restore(template, step)
      except Exception as e:  # pylint: disable=broad-except  (orbax/TensorStore: any read failure)
        raise checkpoints.CheckpointError(f"checkpoint {checkpointer.directory}/{step} cannot be read "
                                          f"({errors.first_line(e)})") from None
    else:
      state, restored, damaged = checkpointer.restore_newest_good(template)
      if damaged:
        print(f"note: checkpoint steps {damaged} in {checkpointer.directory} cannot be read; using step {restored}",
              file=sys.stderr)
  finally:
    checkpointer.close()
  return config, scene, state.params, int(state.step)


def check_workdir(workdir: str) -> None:
  """Rejects a --workdir that cannot be one, before anything is loaded or written."""
  if not workdir:
    raise errors.InputError("--workdir is empty: name a directory for the run's outputs")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.InputError(f"--workdir={workdir} is a file, not a directory")
  if os.path.isdir(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
    raise errors.InputError(f"--workdir={workdir} is not writable")


def make_workdir(workdir: str) -> None:
  """Creates the workdir (the first write a run makes), as a one-line InputError."""
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise PermissionError(13, "not writable")
  except OSError as e:
    raise errors.InputError(f"cannot create --workdir={workdir}: {e.strerror or e}") from None


def flat_config(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """{"field.num_levels": 8, ...}: a config's leaves by dotted name (tuples as lists)."""
  out = {}
  for key, value in dict(config).items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


# Fields that say where and how a run is launched, not what it computes: they may
# differ between the processes of one job and between a run and its restart.
LAUNCH_FIELDS = ("distributed", "cluster.")


def config_differences(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """Fields whose values differ, as "field.num_levels: 8 -> 4", launch fields aside."""
  a = flat_config(json.loads(old.to_json_best_effort()))
  b = flat_config(json.loads(new.to_json_best_effort()))
  return [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and not k.startswith(LAUNCH_FIELDS)]


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's resolved config; a changed one on resume keeps the old as
  config.previous.json (call only once the resume is known to work)."""
  path = os.path.join(workdir, CONFIG_FILE)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if config_differences(ml_collections.ConfigDict(json.loads(old)), config):
      print(f"note: {path} differs from this run's config; resuming with the new one "
            f"(the old one is kept as config.previous.json)")
      files.write_text(os.path.join(workdir, "config.previous.json"), old)
  files.write_text(path, text)


def resume_state(config: ml_collections.ConfigDict, workdir: str, initial: state_lib.TrainState
                 ) -> state_lib.TrainState:
  """The state to continue from: the latest checkpoint in `workdir`, or `initial`.

  Reads only. A checkpoint whose arrays have other shapes than this config's (a
  resumed run with e.g. another field.num_levels), or one that cannot be read, stops
  the run with one line naming it (and the config fields that differ, or the newest
  checkpoint that restores); nothing is deleted or rewritten.
  """
  from dreamfusion_jax import checkpoints

  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return initial
  checkpointer = checkpoints.Checkpointer(directory, max_to_keep=config.train.keep_checkpoints, create=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      return initial
    latest = steps[-1]

    def damaged(error: Exception) -> Exception:
      try:
        _, good, _ = checkpointer.restore_newest_good(initial, below=latest)
        hint = (f"the newest checkpoint that restores is step {good}: move {directory}/{latest} elsewhere to "
                f"resume from it")
      except checkpoints.CheckpointError:
        hint = "no older checkpoint restores: use a new --workdir"
      return checkpoints.CheckpointError(f"checkpoint {directory}/{latest} is damaged ({errors.first_line(error)}); "
                                         f"{hint}")

    try:
      mismatches = checkpointer.shape_mismatches(initial, latest)
    except Exception as e:  # pylint: disable=broad-except  (unreadable metadata)
      raise damaged(e) from None
    if mismatches:
      try:
        changed = config_differences(load_config(workdir), config)
      except (OSError, ValueError):
        changed = [f"(no readable {CONFIG_FILE})"]
      raise checkpoints.CheckpointError(
          f"{workdir} holds a run whose parameters have other shapes than this config's "
          f"({len(mismatches)} arrays, e.g. {mismatches[0]}); fields that differ from its {CONFIG_FILE}: "
          f"{'; '.join(changed) or '(none)'}. Resume with the run's config, or use a new --workdir")
    try:
      state = checkpointer.restore(initial, latest)
    except Exception as e:  # pylint: disable=broad-except  (orbax/TensorStore: any read failure)
      raise damaged(e) from None
  finally:
    checkpointer.close()
  print(f"resumed from {directory}/{int(state.step)}")
  return state
