"""Fields: density blobs against their closed forms and sources; the field's output wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dreamfusion
from dreamfusion_jax import fields, scene as scene_lib

# Points at known distances r from the origin, in different directions.
RADII = np.array([0.0, 0.1, 0.2, 0.5, 0.8])
DIRECTIONS = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0], [0.6, 0.8, 0], [0, -0.6, 0.8]])
POINTS = jnp.asarray(RADII[:, None] * DIRECTIONS, jnp.float32)


def test_dreamfusion_blob_is_a_gaussian_bump():
  # DreamFusion / threestudio "blob_dreamfusion": 5 exp(-r^2 / (2 * 0.2^2)).
  got = fields.density_blob(POINTS, kind="dreamfusion", strength=5.0, radius=0.2)
  np.testing.assert_allclose(got, 5.0 * np.exp(-RADII**2 / 0.08), rtol=1e-6)
  np.testing.assert_allclose(got[2], 5.0 * np.exp(-0.5), rtol=1e-6)  # one std out: 5 / sqrt(e)


def test_magic3d_blob_is_linear_in_the_radius():
  # Magic3D / threestudio "blob_magic3d": 10 (1 - r / 0.5), negative outside r = 0.5.
  got = fields.density_blob(POINTS, kind="magic3d", strength=10.0, radius=0.5)
  # atol: the origin's |x| is sqrt(0 + 1e-12) = 1e-6 (kept so normals are defined there).
  np.testing.assert_allclose(got, [10.0, 8.0, 6.0, 0.0, -6.0], atol=3e-5)


def test_no_blob_is_zero():
  np.testing.assert_array_equal(fields.density_blob(POINTS, kind="none", strength=10.0, radius=0.5), 0.0)


@pytest.mark.parametrize("kind", ["linear", "gaussian", "blob_magic3d", ""])
def test_old_and_unknown_blob_kinds_are_rejected_naming_the_field(kind):
  with pytest.raises(ValueError) as err:
    fields.density_blob(POINTS, kind=kind, strength=5.0, radius=0.5)
  message = str(err.value)
  assert "\n" not in message and "config.field.blob_kind" in message and repr(kind) in message
  assert "dreamfusion, magic3d, none" in message
  config = dreamfusion.get_config("tiny")
  config.field.blob_kind = kind
  with pytest.raises(ValueError, match="config.field.blob_kind must be one of dreamfusion, magic3d, none"):
    scene_lib.build_scene(config)


def test_blob_sources_are_the_published_settings():
  assert fields.BLOB_SOURCES == {
      "dreamfusion": {"blob_strength": 5.0, "blob_radius": 0.2, "density_activation": "exp"},
      "magic3d": {"blob_strength": 10.0, "blob_radius": 0.5, "density_activation": "softplus"},
  }


def test_default_config_uses_its_blob_at_the_source_settings():
  f = dreamfusion.get_config().field
  assert f.blob_kind == "magic3d"
  assert {k: f[k] for k in ("blob_strength", "blob_radius", "density_activation")} == fields.BLOB_SOURCES["magic3d"]


@pytest.mark.parametrize("kind", ["dreamfusion", "magic3d"])
def test_field_density_is_the_activated_blob_when_the_mlp_outputs_zero(kind):
  source = fields.BLOB_SOURCES[kind]
  field = fields.NeRFField(encoding="positional", num_frequencies=2, hidden_dim=8, num_layers=1, blob_kind=kind,
                           blob_strength=source["blob_strength"], blob_radius=source["blob_radius"],
                           density_activation=source["density_activation"])
  params = field.init(jax.random.PRNGKey(0), POINTS)["params"]
  params = dict(params, output=jax.tree_util.tree_map(jnp.zeros_like, params["output"]))
  density, albedo = field.apply({"params": params}, POINTS)
  r = RADII
  if kind == "dreamfusion":
    want = np.exp(5.0 * np.exp(-r**2 / 0.08))
  else:
    want = np.log1p(np.exp(10.0 * (1.0 - r / 0.5)))
  np.testing.assert_allclose(density, want, rtol=1e-5)
  np.testing.assert_allclose(albedo, 0.5, atol=1e-7)  # sigmoid(0)
