"""The scripts' shared command-line boundary: default XLA CPU flags."""

import jaxlib

from dreamfusion_jax import cli


def test_cpu_flags_are_added_once_and_a_users_setting_wins():
  env = {}
  added = cli.apply_cpu_xla_flags(env)
  if not jaxlib.__version__.startswith("0.10."):  # XLA would abort on a flag it does not know
    assert added == [] and env == {}
    return
  assert added == ["--xla_cpu_experimental_ynn_fusion_type=-reduce"]
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-reduce"
  assert cli.apply_cpu_xla_flags(env) == [] and env["XLA_FLAGS"].count("ynn_fusion_type") == 1

  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type="}
  assert cli.apply_cpu_xla_flags(env) == []
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type="

  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  cli.apply_cpu_xla_flags(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                      "--xla_cpu_experimental_ynn_fusion_type=-reduce"]
