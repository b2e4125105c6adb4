"""Scenes per hour: N scenes in one job (dreamfusion_jax/multiscene.py) against N runs
one after another, for each N in --scenes. Prints a markdown table (and --json).

  python scripts/benchmark_scenes.py --config=configs/toy.py --scenes=1,2,4,8

For each N the scenes are the config with the toy prompts in turn and seeds 0..N-1. The
step is compiled once per N (timed: "compile s"), then --steps steps are timed after
--warmup; a run's time is compile + config.train.steps x step time (no renders, video,
mesh or checkpoints: the same for both ways, so left out). "N sequential runs" is N x
the N = 1 run (each run compiles; a persistent compilation cache would save all but the
first compile, shown as "sequential, cached").
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

from dreamfusion_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy.py", "Experiment config file (path[:variant]).")
_SCENES = flags.DEFINE_list("scenes", ["1", "2", "4", "8"], "Scene counts to measure.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per scene count.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after the compile.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")


def main(argv):
  del argv
  cli.apply_cpu_xla_flags()
  import jax
  import numpy as np

  from dreamfusion_jax import multiscene, runs, toy_world

  base = _CONFIG.value
  prompts = [p for p, _, _ in toy_world.all_prompts()]
  first = runs.setup_run(base)
  shared = (first.guidance, first.guidance_params)
  rows = []
  for n in [int(s) for s in _SCENES.value]:
    configs = []
    for k in range(n):
      c = base.copy_and_resolve_references()
      c.prompt, c.seed = prompts[k % len(prompts)], k
      configs.append(c)
    parts = [runs.setup_run(c, guidance_and_params=shared) for c in configs]
    job = multiscene.build_job(configs, parts, [p.state for p in parts])
    state, *rest = job.args
    start = time.perf_counter()
    compiled = job.step.lower(state, *rest).compile()
    compile_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, *rest)
    jax.block_until_ready(state)
    times = []
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      state, metrics = compiled(state, *rest)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    run_s = compile_s + base.train.steps * step_s
    rows.append({"scenes": n, "devices": len(job.devices), "compile_s": compile_s, "step_s": step_s,
                 "job_s": run_s, "scenes_per_hour": multiscene.scenes_per_hour(n, run_s)})
    print(f"N={n}: compile {compile_s:.1f} s, step {step_s * 1e3:.1f} ms ({step_s * 1e3 / n:.1f} ms per scene)",
          flush=True)
  one = next((r for r in rows if r["scenes"] == 1), None)
  print(f"\n{jax.devices()[0].device_kind} x{jax.local_device_count()}, jax {jax.__version__}; "
        f"{base.train.steps} steps a run, batch {base.train.batch_size} per scene, "
        f"{base.render.height}x{base.render.width} renders\n")
  print("| N scenes | devices | compile s | step ms | ms per scene-step | one job: s | scenes/hour | "
        "N sequential runs: s | scenes/hour | sequential, cached: scenes/hour |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    n = r["scenes"]
    seq = f"{n * one['job_s']:.0f} | {multiscene.scenes_per_hour(n, n * one['job_s']):.1f}" if one else "- | -"
    cached = (multiscene.scenes_per_hour(n, one["compile_s"] + n * (one["job_s"] - one["compile_s"]))
              if one else None)
    print(f"| {n} | {r['devices']} | {r['compile_s']:.1f} | {r['step_s'] * 1e3:.1f} | {r['step_s'] * 1e3 / n:.1f} | "
          f"{r['job_s']:.0f} | {r['scenes_per_hour']:.1f} | {seq} | " + (f"{cached:.1f} |" if one else "- |"))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"rows": rows, "device": str(jax.devices()[0]), "steps_per_run": base.train.steps}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
