"""runs.py: reading older workdirs' configs, naming config differences, workdir checks."""

import copy
import json
import os

import pytest

from configs import dreamfusion, toy
from dreamfusion_jax import errors, runs, scene as scene_lib


def saved(config) -> dict:
  return json.loads(config.to_json_best_effort())


def test_an_older_runs_config_reads_in_todays_names():
  current = saved(toy.get_config())
  old = copy.deepcopy(current)
  old["field"]["blob_kind"] = "linear"  # the name of Magic3D's blob before it was corrected
  for section, name in runs._ADDED_FIELDS:  # pylint: disable=protected-access
    del old[section][name]
  upgraded = runs.upgrade_config(old)
  assert upgraded["field"]["blob_kind"] == "magic3d"
  assert upgraded["field"]["progressive_start_step"] == 0 and upgraded["train"]["mesh_target_faces"] == 0
  assert upgraded["guidance"]["sample_posterior"] is False
  assert upgraded["reference"]["object_size"] == 0.0  # image-to-3D runs before recentring used the image as given
  # Apart from the launch fields the old run did not have, it is today's toy config.
  import ml_collections

  assert runs.config_differences(ml_collections.ConfigDict(upgraded), toy.get_config()) == []
  scene_lib.build_scene(ml_collections.ConfigDict(upgraded))

  gaussian = copy.deepcopy(current)
  gaussian["field"]["blob_kind"] = "gaussian"
  assert runs.upgrade_config(gaussian)["field"]["blob_kind"] == "dreamfusion"


def test_a_latent_mode_run_is_refused_by_name():
  old = saved(dreamfusion.get_config())
  old["guidance"]["latent_mode"] = True
  with pytest.raises(errors.InputError, match="latent_mode"):
    runs.upgrade_config(old)


def test_config_differences_name_fields_and_ignore_launch_fields():
  a, b = dreamfusion.get_config(), dreamfusion.get_config()
  b.field.num_levels = 4
  b.cameras.radius_range = (1.2, 1.8)
  b.cluster.process_id = 3
  b.distributed = True
  assert runs.config_differences(a, b) == ["cameras.radius_range: [1.0, 1.5] -> [1.2, 1.8]",
                                           "field.num_levels: 16 -> 4"]


def test_workdir_checks_name_the_path(tmp_path):
  runs.check_workdir(str(tmp_path / "new"))  # absent: fine, nothing created
  assert not os.path.exists(tmp_path / "new")
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.InputError, match="is a file"):
    runs.check_workdir(str(tmp_path / "file"))
  with pytest.raises(errors.InputError, match="does not exist"):
    runs.check_run_dir(str(tmp_path / "new"))
  with pytest.raises(errors.InputError, match="has no config.json"):
    runs.check_run_dir(str(tmp_path))


def test_orbax_closed_loop_noise_is_dropped_and_other_unraisables_pass(monkeypatch):
  import sys
  import types

  from dreamfusion_jax import checkpoints

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)))
  checkpoints._drop_closed_loop_noise()
  checkpoints._drop_closed_loop_noise()  # installed once
  sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed")))
  sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("something else")))
  sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("Event loop is closed")))
  assert seen == ["RuntimeError('something else')", "ValueError('Event loop is closed')"]
  import logging

  asyncio_log = logging.getLogger("asyncio")
  never_retrieved = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Task exception was never retrieved", (), None)
  other = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Executing <Task> took 1.2 seconds", (), None)
  assert not asyncio_log.filter(never_retrieved) and asyncio_log.filter(other)
