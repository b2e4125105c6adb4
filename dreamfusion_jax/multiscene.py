"""Many scenes in one job: N runs that differ in prompt, seed or learning rate, trained
by one compiled step that shares the frozen guidance weights.

One image per chip per step leaves an accelerator mostly idle at DreamFusion's render
sizes; a sweep of prompts or seeds is N independent optimisations of the same shapes.
Here the train step (`train.train_step`, unchanged) is `vmap`ped over a leading scene
axis of the state, the prompt embeddings, the run key and a learning-rate scale, with
the guidance parameters broadcast (one copy per device, whatever N is), and that axis
is split across the local devices (`pmap`) when N allows: d = the largest divisor of N
that is at most the device count, N / d scenes per device.

Each scene is an ordinary run in its own sub-workdir (config.json, checkpoints/,
metrics.jsonl, renders/, the video and mesh at the end), so `scripts/train.py` can
resume any one of them alone, and export and scoring read them as usual. Scene k of a
job equals the single-scene run of its config (`tests/test_multiscene.py`): the same
keys, views and arithmetic, vmapped.

What may differ between the scenes of one job (`SCENE_FIELDS`): the prompt, the seed,
`optim.lr` (the field's Adam step is linear in its learning rate, so scene k's updates
are the base config's times lr_k / lr_0: the same math, equal to float rounding), the
guidance scale and the regularizer weights (traced per-scene scalars in place of the
static settings: `train.train_step`'s `scene_values`). Any other difference (a shape,
a schedule, a warm-up: settings compiled into the step) is refused with one line: run
those as separate jobs (`scripts/sweep.py` does both).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from dreamfusion_jax import checkpoints, errors, runs, sweep
from dreamfusion_jax import train as train_lib
from dreamfusion_jax.state import TrainState

SCENE_FIELDS = sweep.SCENE_FIELDS
# The numeric scene fields: train_step's scene_values key and the value of scene k.
_SCENE_VALUES = {
    "optim.lr": ("lr_scale", lambda c, base: c.optim.lr / base.optim.lr),
    "guidance.guidance_scale": ("guidance_scale", lambda c, base: c.guidance.guidance_scale),
    "loss.orientation_weight": ("orientation", lambda c, base: c.loss.orientation_weight),
    "loss.opacity_weight": ("opacity", lambda c, base: c.loss.opacity_weight),
    "loss.entropy_weight": ("entropy", lambda c, base: c.loss.entropy_weight),
}
SCENE_AXIS = "scenes"


def differing_fields(configs: Sequence[ml_collections.ConfigDict]) -> list[str]:
  """Dotted names of the fields whose values are not the same in every config."""
  flat = [runs.flat_config(c) for c in configs]
  keys = sorted(set().union(*flat))
  return [k for k in keys if any(f.get(k, None) != flat[0].get(k, None) for f in flat[1:])]


def check_scene_configs(configs: Sequence[ml_collections.ConfigDict], names: Sequence[str]) -> None:
  """Raises InputError unless `configs` can be the scenes of one job."""
  if not configs:
    raise errors.InputError("a multi-scene job needs at least one scene")
  if len(names) != len(configs) or len(set(names)) != len(names):
    raise errors.InputError(f"each scene needs its own sub-workdir name; got {list(names)}")
  other = [f for f in differing_fields(configs) if f not in SCENE_FIELDS]
  if other:
    raise errors.InputError(f"the scenes of one job may differ only in {', '.join(SCENE_FIELDS)}; these differ too: "
                            f"{', '.join(other)} (run them as separate jobs)")
  if configs[0].optim.lr <= 0 or any(c.optim.lr <= 0 for c in configs):
    raise errors.InputError(f"optim.lr must be > 0 in every scene; got {[c.optim.lr for c in configs]}")
  if jax.process_count() > 1:
    raise errors.InputError("multi-scene jobs run in one process (one host); on a multi-host job train one "
                            "scene per job, or one multi-scene job per host")


def scene_devices(num_scenes: int, devices: Sequence[jax.Device]) -> list[jax.Device]:
  """The devices the scene axis is split over: the largest d <= len(devices) dividing N."""
  d = max(k for k in range(1, min(num_scenes, len(devices)) + 1) if num_scenes % k == 0)
  return list(devices[:d])


def stack(trees: Sequence[Any]) -> Any:
  """Host numpy leaves stacked on a new leading scene axis: (N, ...)."""
  return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
  """The inverse of `stack` for host numpy leaves (N, ...)."""
  return [jax.tree_util.tree_map(lambda x: x[k], tree) for k in range(n)]


def shard_scenes(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """Leaves (N, ...) -> arrays (d, N / d, ...) with row i on devices[i], as pmap expects."""
  d = len(devices)
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (SCENE_AXIS,)),
                                        jax.sharding.PartitionSpec(SCENE_AXIS))

  def put(x):
    x = np.asarray(x)
    x = x.reshape((d, x.shape[0] // d) + x.shape[1:])
    shards = [jax.device_put(x[i:i + 1], dev) for i, dev in enumerate(devices)]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)

  return jax.tree_util.tree_map(put, tree)


def gather_scenes(tree: Any) -> Any:
  """Device arrays (d, N / d, ...) -> host numpy (N, ...)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)).reshape((-1,) + x.shape[2:]), tree)


# The step counter is shared (every scene of a job is at the same step) and not mapped:
# a batched counter would turn train_step's lax.cond on it into a select that XLA CPU
# fuses through (the cond is what stops it; 408 -> 284 ms a step at N = 1 on the toy config).
_STATE_AXES = TrainState(step=None, params=0, opt_state=0, num_skipped=0)


def scene_values(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
  """train_step's scene_values for the numeric fields that differ between `configs`:
  {key: (N,) float32}; {} when only prompts and seeds differ."""
  differ = set(differing_fields(configs))
  return {key: np.asarray([fn(c, configs[0]) for c in configs], np.float32)
          for field, (key, fn) in _SCENE_VALUES.items() if field in differ}


def make_scene_step(scene, guidance, method, settings, tx, devices) -> Any:
  """`train.train_step` vmapped over the scene axis of (state, embeddings, key,
  scene_values), guidance parameters and the step counter shared, pmapped over
  `devices`; the state is donated.

  Arguments of the returned function: state (leaves (d, n, ...), step (d,)), guidance
  params (d, ...), embeddings (d, n, ...), keys (d, n, 2), scene values {key: (d, n)}.
  Returns the new state and metrics (d, n).
  """
  step = functools.partial(train_lib.train_step, scene=scene, guidance=guidance, method=method, settings=settings,
                           tx=tx,
                           axis_name=None)
  per_device = jax.vmap(lambda s, g, e, k, v: step(s, g, e, k, scene_values=v), in_axes=(_STATE_AXES, None, 0, 0, 0),
                        out_axes=(_STATE_AXES, 0))
  return jax.pmap(per_device, axis_name=SCENE_AXIS, donate_argnums=(0,), devices=devices)


def shard_states(states: Sequence[TrainState], devices: Sequence[jax.Device]) -> TrainState:
  """Per-scene states (all at one step) -> the job's state: leaves (d, N / d, ...), the
  shared step counter (d,)."""
  sharded = shard_scenes(stack([jax.device_get(s.replace(step=None)) for s in states]), devices)
  return sharded.replace(step=train_lib.replicate(np.asarray(states[0].step, np.int32), devices))


def gather_states(state: TrainState, n: int) -> list[TrainState]:
  """The job's state -> the N scenes' states as host numpy."""
  step = np.asarray(state.step.addressable_data(0))[0]
  return [s.replace(step=step) for s in unstack(gather_scenes(state.replace(step=None)), n)]


@dataclasses.dataclass
class Job:
  """A multi-scene job's compiled-to-be step and its device arguments."""
  devices: list
  step: Any  # make_scene_step's function
  args: tuple  # (state, guidance params, embeddings, keys, scene values), sharded over devices


def build_job(configs: Sequence[ml_collections.ConfigDict], parts: Sequence[runs.RunParts],
              states: Sequence[TrainState]) -> Job:
  """The step and its sharded arguments for scenes `parts` (runs.setup_run of each
  config, the first one's guidance shared) starting from `states`."""
  base = configs[0]
  devices = scene_devices(len(configs), jax.local_devices())
  settings = train_lib.StepSettings.from_config(base, num_devices=1)  # a scene's whole batch is on one device
  args = (shard_states(states, devices),
          train_lib.replicate(parts[0].guidance_params, devices),
          shard_scenes(stack([jax.device_get(p.embeddings) for p in parts]), devices),
          shard_scenes(stack([jax.device_get(p.base_key) for p in parts]), devices),
          shard_scenes(scene_values(configs), devices))
  return Job(devices, make_scene_step(parts[0].scene, parts[0].guidance, parts[0].method, settings, parts[0].tx,
                                     devices), args)


@dataclasses.dataclass
class _SceneOutputs:
  """The per-scene writers of a job (process 0 only)."""
  workdir: str
  config: ml_collections.ConfigDict
  writer: train_lib.MetricWriter
  checkpointer: checkpoints.Checkpointer


def train_scenes(configs: Sequence[ml_collections.ConfigDict], workdir: str, names: Sequence[str]
                 ) -> list[TrainState]:
  """Trains (or resumes) N scenes in one job, scene k in `workdir/names[k]`.

  Returns:
    the final TrainState of each scene (host numpy), in the order of `configs`.

  Raises:
    InputError: scenes that cannot share a job, a bad workdir, or sub-workdirs that
      resume from different steps; nothing is written then.
  """
  from tqdm import tqdm

  from dreamfusion_jax import images, visualize

  check_scene_configs(configs, names)
  for c in configs:
    train_lib.validate_config(c)
  runs.check_workdir(workdir)
  dirs = [os.path.join(workdir, n) for n in names]
  for d in dirs:
    runs.check_workdir(d)
  base = configs[0]
  first = runs.setup_run(base)  # the prior first: a missing model fails before anything compiles
  shared = (first.guidance, first.guidance_params)
  parts = [first] + [runs.setup_run(c, guidance_and_params=shared) for c in configs[1:]]
  states = [runs.resume_state(c, d, p.state) for c, d, p in zip(configs, dirs, parts)]
  steps = sorted({int(s.step) for s in states})
  if len(steps) > 1:
    found = ", ".join(f"{n}: {int(s.step)}" for n, s in zip(names, states))
    raise errors.InputError(f"the scenes of {workdir} resume from different steps ({found}): resume each with "
                            f"scripts/train.py, or move the odd ones elsewhere")
  for c, d in zip(configs, dirs):
    runs.make_workdir(d)
    runs.write_config(c, d)

  n = len(configs)
  job = build_job(configs, parts, states)
  devices, p_step, (p_state, p_guidance, p_embeddings, p_keys, p_values) = job.devices, job.step, job.args
  scene, t = first.scene, base.train
  eval_render = visualize.make_eval_renderer(scene, height=t.eval_height, width=t.eval_width,
                                             chunk_size=base.render.eval_chunk)
  eval_cams = visualize.eval_cameras(base)
  outs = [_SceneOutputs(d, c, train_lib.MetricWriter(d, True),
                        checkpoints.Checkpointer(os.path.join(d, runs.CHECKPOINT_DIR), max_to_keep=t.keep_checkpoints))
          for c, d in zip(configs, dirs)]
  print(f"{n} scenes in one job on {len(devices)} device(s), {n // len(devices)} per device: "
        + ", ".join(names), flush=True)

  start = step = steps[0]
  last_time, last_step = time.perf_counter(), start
  with checkpoints.StopRequest() as stop, tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True) as bar:
    while step < t.steps:
      p_state, p_metrics = p_step(p_state, p_guidance, p_embeddings, p_keys, p_values)
      step += 1
      bar.update(1)
      logging = step % t.log_every == 0 or step == t.steps
      saving = checkpoints.due(step, every=t.ckpt_every, last=t.steps, stopping=stop.signal is not None)
      rendering = step % t.eval_every == 0 or step == t.steps
      if not (logging or saving or rendering):
        continue
      host = gather_states(p_state, n)
      if logging:
        metrics = unstack(gather_scenes(p_metrics), n)
        now = time.perf_counter()
        step_time = (now - last_time) / (step - last_step)
        last_time, last_step = now, step
        for out, m, s in zip(outs, metrics, host):
          out.writer.write(step, {**{k: float(v) for k, v in m.items()}, "step_time_s": step_time,
                                  "num_skipped": float(s.num_skipped)})
        bar.set_postfix(loss=f"{np.mean([float(m['loss']) for m in metrics]):.4g}")
      if saving:
        for out, s in zip(outs, host):
          out.checkpointer.save(step, s)
      if rendering:
        for out, s in zip(outs, host):
          grid = visualize.validation_grid(jax.device_get(eval_render(s.params, eval_cams,
                                                                       level_mask=scene.level_mask(step))))
          images.save_png(os.path.join(out.workdir, "renders", f"step_{step:06d}.png"), grid)
          out.writer.write_image(step, "renders", grid)
      if stop.signal is not None:
        for out in outs:
          out.checkpointer.wait()
        print(f"\nstopped by signal {stop.signal} at step {step}; checkpoints saved, rerun to resume")
        break
  final = gather_states(p_state, n)
  for out in outs:
    out.checkpointer.wait()
    out.checkpointer.close()
    out.writer.close()
  if step >= t.steps:
    for out, s in zip(outs, final):
      train_lib.write_final_outputs(out.config, scene, s.params, out.workdir, step)
  return final


def scenes_per_hour(num_scenes: int, wall_s: float) -> float:
  return num_scenes * 3600.0 / wall_s if wall_s > 0 else math.inf
