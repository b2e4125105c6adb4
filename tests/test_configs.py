"""The experiment configs as a user meets them: flags the locked CLI accepts, and what
the defaults sample (view buckets, blob, VAE posterior)."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import dreamfusion
from dreamfusion_jax import cameras, train
from dreamfusion_jax.guidance.priors import stable_diffusion as sd
from dreamfusion_jax.guidance import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_cli(*overrides, variant=":tiny", name="dreamfusion"):
  """The config as scripts/train.py parses it (lock_config: unknown fields are errors)."""
  argv = ["train.py", f"--config={os.path.join(REPO, 'configs', name + '.py')}{variant}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_default_elevations_reach_the_overhead_bucket():
  config = dreamfusion.get_config()
  n = 4000
  config.train.batch_size = n
  settings = train.StepSettings.from_config(config, num_devices=1)
  views = train.sample_views(jax.random.PRNGKey(0), jnp.int32(0), settings)  # the train step's own draws
  cams = views["cameras"]
  buckets = np.asarray(cameras.view_bucket(cams.azimuth_deg, cams.elevation_deg, **dict(settings.bucket_kwargs)))
  # Elevation ~ U[-10, 90] and overhead above 60: P = 30 / 100; +-4 sigma of a binomial.
  sigma = np.sqrt(0.3 * 0.7 / n)
  assert abs(np.mean(buckets == cameras.OVERHEAD) - 0.3) < 4 * sigma
  assert np.all(np.isfinite(np.asarray(cams.c2w)))
  # The old default range (-10, 45) never got there.
  old = cameras.view_bucket(cams.azimuth_deg, jnp.minimum(cams.elevation_deg, 45.0), **dict(settings.bucket_kwargs))
  assert not np.any(np.asarray(old) == cameras.OVERHEAD)


@pytest.mark.parametrize("field,value,message", [
    ("cameras.elevation_range_deg", "(-10.0, 91.0)",
     "config.cameras.elevation_range_deg must lie in [-90, 90], got (-10.0, 91.0)"),
    ("field.blob_kind", "linear", "config.field.blob_kind must be one of dreamfusion, magic3d, none, got 'linear'"),
    ("field.progressive_start_step", "-5", "config.field.progressive_start_step must be >= 0"),
])
def test_validate_config_names_the_field(field, value, message):
  train.validate_config(parse_cli())  # the tiny variant itself is fine, elevation 90 included
  with pytest.raises(train.ConfigError) as err:
    train.validate_config(parse_cli(f"--config.{field}={value}"))
  assert message in str(err.value)


def test_removed_latent_mode_is_an_unknown_field():
  # (ml_collections raises AttributeError for an unknown field; scripts/train.py may word it.)
  with pytest.raises((AttributeError, KeyError, flags.Error), match="latent_mode"):
    parse_cli("--config.guidance.latent_mode=True")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  return str(tiny.build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd")))


def test_sample_posterior_flag_samples_the_vae_posterior(tiny_sd):
  assert parse_cli().guidance.sample_posterior is False  # the default: the posterior mean
  config = parse_cli("--config.guidance.sample_posterior=True", f"--config.guidance.model={tiny_sd}")
  guidance, params = sd.from_config(config.guidance)
  assert guidance.settings.sample_posterior and guidance.settings.image_size == tiny.TINY_IMAGE_SIZE
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  key = jax.random.PRNGKey(1)
  sampled = guidance.encode(params, images, key)
  mean_guidance = dataclasses.replace(guidance,
                                      settings=dataclasses.replace(guidance.settings, sample_posterior=False))
  mean = mean_guidance.encode(params, images, key)
  # Independent reference: the VAE's posterior, scaled; a sample is mean + std * N(0, 1) from `key`.
  x = jnp.transpose(images * 2.0 - 1.0, (0, 3, 1, 2))
  posterior = guidance.vae.apply({"params": params["vae"]}, x, method=guidance.vae.encode).latent_dist
  scale = guidance.vae_scaling_factor
  np.testing.assert_allclose(mean, posterior.mean * scale, rtol=1e-5, atol=1e-6)
  eps = jax.random.normal(key, posterior.mean.shape)
  np.testing.assert_allclose(sampled, (posterior.mean + posterior.std * eps) * scale, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(sampled - mean).max()) > 1e-3  # the two encodings differ


# Each config's fields counted in steps that scale with the run (sweep.follow_steps), with
# their values at the config's own train.steps.
FOLLOWING = {
    "toy": {"guidance.t_anneal_steps": 1},
    "toy_gaussians": {"guidance.t_anneal_steps": 1, "gaussians.densify_until": 1,
                      "optim.gaussians.means_decay_steps": 1, "gaussians.opacity_reset_every": 10},
    "dreamgaussian": {"guidance.t_anneal_steps": 1},
    "zero123": {"guidance.t_anneal_steps": 1},
}


@pytest.mark.parametrize("name", sorted(FOLLOWING))
def test_step_counted_fields_follow_a_train_steps_override(name):
  get = lambda c, key: functools.reduce(lambda node, part: node[part], key.split("."), c)
  default = parse_cli(variant="", name=name)
  steps = default.train.steps
  assert steps != 37
  for key, times in FOLLOWING[name].items():
    assert get(default, key) == times * steps, key
  # --config.train.steps=37 moves each of them (a sweep over run lengths anneals over
  # each run's own length) ...
  short = parse_cli("--config.train.steps=37", variant="", name=name)
  for key, times in FOLLOWING[name].items():
    assert get(short, key) == times * 37, key
  # ... while overriding one of them changes it alone.
  key = next(iter(FOLLOWING[name]))
  one = parse_cli(f"--config.{key}=5", variant="", name=name)
  assert get(one, key) == 5 and one.train.steps == steps
  assert json.loads(one.to_json_best_effort())["train"]["steps"] == steps
