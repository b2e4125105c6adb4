"""The toy benchmark: a config run over toy prompts x seeds, scored in 3D, in tables.

Each run trains in `<workdir>/<prompt>_seed<k>/` (scripts/train.py's layout) and, once
scored, leaves `toy_score.json` there (and `toy_score_views.png`, the views scored); a run with that file is skipped
(or, when it was scored by an older `toy_score.VERSION`, scored again from its
checkpoint without training), an unfinished one resumes from its checkpoints. The untrained start of each seed (the density blob the
optimisation begins from) is scored against every prompt too: the baseline every
threshold is set against. `format_markdown` and the JSON result hold per-run rows, the
baseline rows and the summary (mean and min of each score; how many runs beat every
other shape by `toy_score.MARGIN`, have the right colour, have a torus's hole).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from dreamfusion_jax import files, images, runs, toy_score, toy_world
from dreamfusion_jax import scene as scene_lib
from dreamfusion_jax import state as state_lib

RESULT_FILE = "toy_score.json"
VIEWS_FILE = "toy_score_views.png"  # toy_score.views_image: what the scores saw
TABLE_BASENAME = "toy_benchmark"
LOCK_FILE = ".toy_benchmark.lock"  # one benchmark process per workdir: two would train one run at once


class WorkdirError(ValueError):
  """A run directory that holds a scored run of another config."""


class RunStopped(RuntimeError):
  """Training stopped before its last step (SIGTERM/SIGINT): the run is not scored,
  and the benchmark stops; the same command resumes it."""


# (key of a score row, column title): the numbers summarised by mean and min.
SCORE_COLUMNS = (
    ("silhouette_iou", "sil IoU"),
    ("silhouette_margin", "sil margin"),
    ("volume_iou", "vol IoU"),
    ("volume_margin", "vol margin"),
    ("volume_iou_any_yaw", "vol IoU any yaw"),
    ("volume_margin_any_yaw", "vol margin any yaw"),
    ("centre_opacity_above", "top centre opacity"),
    ("color_distance", "colour dist"),
)


def run_name(prompt: str, seed: int) -> str:
  """The run's directory under the benchmark's workdir: "a_green_torus_seed0"."""
  return f"{prompt.replace(' ', '_')}_seed{seed}"


def run_config(config: ml_collections.ConfigDict, prompt: str, seed: int) -> ml_collections.ConfigDict:
  """The config of one run: `config` with the prompt and seed set, and no end-of-run
  video or mesh (the scores do not look at them; validation renders are still written)."""
  c = config.copy_and_resolve_references()
  c.prompt, c.seed = prompt, seed
  c.train.render_video = False
  if "export_mesh" in c.train:
    c.train.export_mesh = False
  return c


INPUT_IMAGE = "input.png"  # an image-to-3D run's input view, in its run directory
INPUT_IMAGE_SIZE = 128


def is_image_config(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is image-to-3D: its guidance model is a Zero-1-to-3 directory."""
  from dreamfusion_jax.guidance import pipeline_dir  # pylint: disable=g-import-not-at-top

  try:
    return pipeline_dir.is_zero123(pipeline_dir.resolve_model_dir(config.guidance.model))
  except pipeline_dir.ModelNotFoundError:
    return False


def write_input_image(config: ml_collections.ConfigDict, path: str) -> None:
  """The toy object of config.prompt seen from config.reference (albedo, RGBA): the
  input of an image-to-3D run, as scripts/toy_image.py renders it."""
  r = config.reference
  rgb, opacity = toy_world.render_view(config.prompt, elevation_deg=r.elevation_deg, azimuth_deg=r.azimuth_deg,
                                       radius=r.radius, fovy_deg=r.fovy_deg, size=INPUT_IMAGE_SIZE)
  images.save_png(path, images.premultiplied_to_rgba(rgb, opacity))


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]


def untrained_observation(config: ml_collections.ConfigDict) -> dict:
  """`toy_score.observe_scene` of the scene a run of `config` starts from (step 0).

  The parameters are drawn from the key `runs.setup_run` uses, so this is the run's own
  start; it does not depend on the prompt, so one observation serves every prompt.
  """
  scene = scene_lib.build_scene(config)
  params = jax.jit(scene.init)(state_lib.init_key(config.seed))
  return toy_score.observe_scene(scene, params, level_mask=scene.level_mask(0))


def run_one(config: ml_collections.ConfigDict, workdir: str, prompt: str, seed: int, *,
            train_fn: Optional[Callable[[ml_collections.ConfigDict, str], object]] = None,
            log: Callable[[str], None] = print) -> dict:
  """Trains (or resumes, or skips) one run and returns its row of scores.

  Args:
    config: the benchmark's config (prompt and seed are set here).
    workdir: the benchmark's directory; the run lives in workdir/run_name(prompt, seed).
    train_fn: (config, run_dir) -> anything; default train.train_and_evaluate.

  Returns:
    `toy_score.score_arrays`'s dict plus "seed", "step", "train_wall_s" (seconds of
    training in the process that finished it), "resumed" (it continued an earlier
    process's checkpoints), "config_fingerprint" and "yardstick_version".

  Raises:
    WorkdirError: the run directory holds a scored run of another config.
    RunStopped: training returned before cfg.train.steps (a signal stopped it).
  """
  cfg = run_config(config, prompt, seed)
  run_dir = os.path.join(workdir, run_name(prompt, seed))
  result_path = os.path.join(run_dir, RESULT_FILE)
  fingerprint = config_fingerprint(cfg)
  if is_image_config(cfg):  # image-to-3D: the input is the toy object seen from config.reference
    cfg.image = os.path.join(run_dir, INPUT_IMAGE)
    if not os.path.exists(cfg.image):
      write_input_image(cfg, cfg.image)
  if os.path.exists(result_path):
    with open(result_path) as f:
      row = json.load(f)
    if row.get("config_fingerprint") != fingerprint:
      raise WorkdirError(f"{run_dir} holds a run of another config (fingerprint {row.get('config_fingerprint')}, "
                       f"this config's is {fingerprint}): pass another --workdir")
    if row.get("yardstick_version", 1) == toy_score.VERSION:
      log(f"{run_dir}: scored already, skipped")
      return row
    log(f"{run_dir}: scored by yardstick version {row.get('yardstick_version', 1)}, scoring again with "
        f"version {toy_score.VERSION}")
    return score_run(run_dir, prompt, {k: row[k] for k in ("seed", "train_wall_s", "resumed", "config_fingerprint")},
                     log=log)
  if train_fn is None:
    from dreamfusion_jax import train  # the training loop only when something is trained

    train_fn = train.train_and_evaluate
  checkpoints = os.path.join(run_dir, runs.CHECKPOINT_DIR)
  resumed = os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))
  log(f"{run_dir}: training {prompt!r} seed {seed}" + (" (resuming)" if resumed else ""))
  start = time.perf_counter()
  train_fn(cfg, run_dir)
  wall_s = time.perf_counter() - start
  latest = runs.check_run_dir(run_dir)[-1]
  if latest < cfg.train.steps:  # stopped: an unfinished run is never scored
    raise RunStopped(f"{run_dir} stopped at step {latest} of {cfg.train.steps}; rerun the same command to resume")
  return score_run(run_dir, prompt, {"seed": seed, "train_wall_s": wall_s, "resumed": resumed,
                                     "config_fingerprint": fingerprint}, log=log)


def score_run(run_dir: str, prompt: str, record: dict, *, log: Callable[[str], None] = print) -> dict:
  """Scores the trained run in run_dir (its last checkpoint) against `prompt`; writes
  its views image and its row (the scores, `record`, "step", "yardstick_version")."""
  _, scene, params, step = runs.restore_scene(run_dir)
  observation = toy_score.observe_scene(scene, params, level_mask=scene.level_mask(step))
  score = toy_score.score_arrays(prompt, **observation)
  images.save_png(os.path.join(run_dir, VIEWS_FILE), toy_score.views_image(observation, score["prompt_shape"]))
  row = {**score, **record, "step": step, "yardstick_version": toy_score.VERSION}
  files.write_text(os.path.join(run_dir, RESULT_FILE), json.dumps(row, indent=1))
  log(toy_score.summary_line(score))
  return row


def baseline_rows(config: ml_collections.ConfigDict, prompts: Sequence[str], seeds: Sequence[int]) -> list[dict]:
  """The untrained start of each seed scored against each prompt."""
  rows = []
  for seed in seeds:
    observation = untrained_observation(run_config(config, prompts[0], seed))
    rows += [{**toy_score.score_arrays(p, **observation), "seed": seed, "step": 0} for p in prompts]
  return rows


def summarise(rows: Sequence[dict]) -> dict:
  """Mean and min of each score column, and the counts the acceptance figures use."""
  if not rows:
    return {"num_runs": 0}
  out = {"num_runs": len(rows)}
  for key, _ in SCORE_COLUMNS:
    values = np.array([r[key] for r in rows], np.float64)
    out[f"{key}_mean"], out[f"{key}_min"] = float(values.mean()), float(values.min())
  torus = [r for r in rows if r["prompt_shape"] == "torus"]
  out.update({
      "own_shape_best_volume": sum(r["volume_margin"] > 0 for r in rows),
      "volume_margin_at_least": sum(r["volume_margin"] >= toy_score.MARGIN for r in rows),
      "own_shape_best_volume_any_yaw": sum(r["volume_margin_any_yaw"] > 0 for r in rows),
      "volume_margin_any_yaw_at_least": sum(r["volume_margin_any_yaw"] >= toy_score.MARGIN for r in rows),
      "silhouette_margin_at_least": sum(r["silhouette_margin"] >= toy_score.MARGIN for r in rows),
      "right_color": sum(bool(r["right_color"]) for r in rows),
      "torus_runs": len(torus),
      "torus_with_hole": sum(bool(r["has_hole"]) for r in torus),
  })
  return out


def machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()], "jax_version": jax.__version__}


def run_benchmark(config: ml_collections.ConfigDict, workdir: str, *, prompts: Sequence[str], seeds: Sequence[int],
                  train_fn=None, log: Callable[[str], None] = print) -> dict:
  """Every run of prompts x seeds (seed-major), the baseline and the summary.

  Raises:
    ValueError: a prompt that is not a toy prompt (before anything is trained).
    WorkdirError: another process runs a benchmark in `workdir`.
  """
  for p in prompts:
    toy_world.parse_prompt(p)
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  try:
    with files.exclusive_lock(os.path.join(workdir, LOCK_FILE), f"--workdir {workdir}"):
      rows = [run_one(config, workdir, p, s, train_fn=train_fn, log=log) for s in seeds for p in prompts]
  except files.LockedError as e:
    raise WorkdirError(str(e)) from None
  baseline = baseline_rows(config, prompts, seeds)
  return {"machine": machine(), "config": json.loads(config.to_json_best_effort()), "prompts": list(prompts),
          "seeds": list(seeds),
          "wall_s": time.perf_counter() - start, "runs": rows, "baseline": baseline,
          "summary": {"runs": summarise(rows), "baseline": summarise(baseline)},
          "measures": {"margin": toy_score.MARGIN, "hole_opacity": toy_score.HOLE_OPACITY,
                       "elevations_deg": list(toy_score.SILHOUETTE_ELEVATIONS_DEG),
                       "grid_resolution": toy_score.GRID_RESOLUTION,
                       "occupancy_density": toy_score.OCCUPANCY_DENSITY}}


def _cell(value) -> str:
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.3f}"
  return str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _wall(row: dict) -> str:
  if "train_wall_s" not in row:
    return "-"
  # A resumed run's time covers only the process that finished it.
  return f"{row['train_wall_s']:.0f}" + (" (resumed)" if row.get("resumed") else "")


def run_table(rows: Sequence[dict], label: str) -> list[str]:
  """Markdown lines: one row per run (label "run" or "baseline")."""
  header = ["row", "prompt", "seed", *(title for _, title in SCORE_COLUMNS), "best vol shape",
            "best vol shape any yaw", "colour", "train wall s"]
  body = [[label, r["prompt"], r["seed"], *(r[k] for k, _ in SCORE_COLUMNS), r["best_volume_shape"],
           r["best_volume_shape_any_yaw"], r["color"], _wall(r)] for r in rows]
  return _markdown(header, body)


def summary_table(summary: dict) -> list[str]:
  """Markdown lines: mean and min of each score and the counts, for the runs and the baseline."""
  header = ["rows", "n", *(f"{title} {stat}" for _, title in SCORE_COLUMNS for stat in ("mean", "min")),
            "own shape best (vol)", f"vol margin >= {toy_score.MARGIN:g}", "own shape best (vol any yaw)",
            f"vol margin any yaw >= {toy_score.MARGIN:g}", f"sil margin >= {toy_score.MARGIN:g}",
            "right colour", "torus with hole"]
  body = []
  for name in ("runs", "baseline"):
    s = summary[name]
    if not s["num_runs"]:
      continue
    n = s["num_runs"]
    body.append([name, n, *(s[f"{k}_{stat}"] for k, _ in SCORE_COLUMNS for stat in ("mean", "min")),
                 f"{s['own_shape_best_volume']}/{n}", f"{s['volume_margin_at_least']}/{n}",
                 f"{s['own_shape_best_volume_any_yaw']}/{n}", f"{s['volume_margin_any_yaw_at_least']}/{n}",
                 f"{s['silhouette_margin_at_least']}/{n}", f"{s['right_color']}/{n}",
                 f"{s['torus_with_hole']}/{s['torus_runs']}"])
  return _markdown(header, body)


def format_markdown(result: dict) -> str:
  m = result["machine"]
  lines = [f"Toy benchmark: {len(result['runs'])} runs ({len(result['prompts'])} prompts x seeds "
           f"{result['seeds']}) on {m['processor']} x{m['cpu_count']} ({m['platform']}, jax {m['jax_version']}); "
           f"benchmark wall time {result['wall_s']:.0f} s.", ""]
  lines += run_table(result["runs"], "run") + run_table(result["baseline"], "baseline")[2:]
  lines += ["", *summary_table(result["summary"])]
  return "\n".join(lines) + "\n"


def write_tables(result: dict, workdir: str) -> tuple[str, str]:
  """Writes workdir/toy_benchmark.md and .json (atomically); returns their paths."""
  md, js = (os.path.join(workdir, f"{TABLE_BASENAME}.{ext}") for ext in ("md", "json"))
  files.write_text(js, json.dumps(result, indent=1))
  files.write_text(md, format_markdown(result))
  return md, js
