"""The trainable state of a text-to-3D run: scene parameters, optimiser, counters.

Kept apart from the loop (train.py) so that run-level tools (runs.py: restore a run for
export or scoring) build the same state without importing the training loop.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dreamfusion_jax import scene as scene_lib

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; randomness is derived from `step`.

  Attributes:
    step: int32 scalar, number of steps taken (skipped ones included).
    params: {"field": ..., "background": ...}, and "guidance": the guidance method's
      own trainable parameters where it has some (VSD's LoRA; the method's `init_state`).
    opt_state: optax state.
    num_skipped: int32 scalar, steps whose loss or gradient was not finite.
  """

  step: Array
  params: Any
  opt_state: Any
  num_skipped: Array


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   guidance_lr: float | None = None) -> optax.GradientTransformation:
  """Adam with eps 1e-15 (instant-ngp's choice for hash tables), per-group learning
  rates for the field and the background, optional global-norm clipping and schedule.

  guidance_lr: the learning rate of a third group "guidance" (the guidance method's own
  parameters, see TrainState), or None where there is none (the method's `state_learning_rate`).
  The clipping, where on, is over every group's gradients together.

  With `optim.gaussians` (a Gaussian scene, gaussians/scene.py), each Gaussian
  parameter has its own Adam and learning rate, as DreamGaussian's; the means' decays
  exponentially from `means` to `means_final` over `means_decay_steps` (the reference's
  get_expon_lr_func without delay), and the pool's bookkeeping ("field"/"pool") is frozen.
  """

  def schedule(lr):
    if optim.schedule == "constant":
      sched = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
      sched = optax.cosine_decay_schedule(lr, max(total_steps - optim.warmup_steps, 1))
    else:
      raise ValueError(f"config.optim.schedule must be constant or cosine; got {optim.schedule!r}")
    if optim.warmup_steps > 0:
      sched = optax.join_schedules([optax.linear_schedule(0.0, lr, optim.warmup_steps), sched],
                                   [optim.warmup_steps])
    return sched

  def adam(lr):
    return optax.adam(lr if callable(lr) else schedule(lr), b1=optim.b1, b2=optim.b2, eps=optim.eps)

  groups = {"field": adam(optim.lr), "background": adam(optim.background_lr)}
  if guidance_lr is not None:
    groups["guidance"] = adam(guidance_lr)
  labels = {name: name for name in groups}
  gs = optim.get("gaussians")
  if gs is not None:
    means_lr = optax.exponential_decay(gs.means, transition_steps=gs.means_decay_steps,
                                       decay_rate=gs.means_final / gs.means, end_value=gs.means_final)
    groups = {**{k: v for k, v in groups.items() if k != "field"}, "frozen": optax.set_to_zero(),
              **{f"gaussians/{name}": adam(means_lr if name == "means" else gs[name])
                 for name in ("means", "log_scales", "rotations", "opacity_logits", "color_logits")}}

    def labels(params):
      field = params["field"]
      out = {name: jax.tree_util.tree_map(lambda _, n=name: n, params[name]) for name in params if name != "field"}
      return {**out, "field": {"gaussians": {name: f"gaussians/{name}" for name in field["gaussians"]},
                               "pool": jax.tree_util.tree_map(lambda _: "frozen", field["pool"])}}

  tx = optax.multi_transform(groups, labels)
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx


def create_train_state(scene: scene_lib.Scene, tx: optax.GradientTransformation, key: Array,
                       guidance_trainable: Any = None) -> TrainState:
  """The state at step 0: the scene initialised from `key`, and the guidance's own
  parameters where it has some (the method's `init_state`; None: none)."""
  params = scene.init(key)
  if guidance_trainable is not None:
    params = {**params, "guidance": guidance_trainable}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    num_skipped=jnp.zeros((), jnp.int32))


def init_key(seed: int) -> Array:
  """The key a run's scene parameters are initialised with (the other half of the
  split is the run's base key for per-step randomness)."""
  return jax.random.split(jax.random.PRNGKey(seed))[0]


def guidance_init_key(seed: int) -> Array:
  """The key the guidance's own parameters (VSD's LoRA) are initialised with."""
  return jax.random.fold_in(init_key(seed), 1)


def base_key(seed: int) -> Array:
  """The key every step's randomness is folded from: fold_in(base_key, step)."""
  return jax.random.split(jax.random.PRNGKey(seed))[1]

