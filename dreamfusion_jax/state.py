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
    params: {"field": ..., "background": ...}.
    opt_state: optax state.
    num_skipped: int32 scalar, steps whose loss or gradient was not finite.
  """

  step: Array
  params: Any
  opt_state: Any
  num_skipped: Array


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Adam with eps 1e-15 (instant-ngp's choice for hash tables), per-group learning
  rates for the field and the background, optional global-norm clipping and schedule.

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
  labels = {"field": "field", "background": "background"}
  gs = optim.get("gaussians")
  if gs is not None:
    means_lr = optax.exponential_decay(gs.means, transition_steps=gs.means_decay_steps,
                                       decay_rate=gs.means_final / gs.means, end_value=gs.means_final)
    groups = {"background": groups["background"], "frozen": optax.set_to_zero(),
              **{f"gaussians/{name}": adam(means_lr if name == "means" else gs[name])
                 for name in ("means", "log_scales", "rotations", "opacity_logits", "color_logits")}}

    def labels(params):
      field = params["field"]
      return {"field": {"gaussians": {name: f"gaussians/{name}" for name in field["gaussians"]},
                        "pool": jax.tree_util.tree_map(lambda _: "frozen", field["pool"])},
              "background": jax.tree_util.tree_map(lambda _: "background", params["background"])}

  tx = optax.multi_transform(groups, labels)
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx


def create_train_state(scene: scene_lib.Scene, tx: optax.GradientTransformation, key: Array) -> TrainState:
  params = scene.init(key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    num_skipped=jnp.zeros((), jnp.int32))


def init_key(seed: int) -> Array:
  """The key a run's scene parameters are initialised with (the other half of the
  split is the run's base key for per-step randomness)."""
  return jax.random.split(jax.random.PRNGKey(seed))[0]


def base_key(seed: int) -> Array:
  """The key every step's randomness is folded from: fold_in(base_key, step)."""
  return jax.random.split(jax.random.PRNGKey(seed))[1]

