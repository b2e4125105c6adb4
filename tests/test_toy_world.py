"""The toy world and the pixel-space prior path (no trained weights needed). The ground-truth
silhouettes and volumes are checked against closed forms in test_toy_score.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax import toy_prior, toy_world


@pytest.mark.parametrize("shape", toy_world.SHAPES)
def test_sdf_is_negative_inside_and_a_distance(shape):
  i = toy_world.SHAPES.index(shape)
  inside = {"cube": [0.0, 0.0, 0.0], "sphere": [0.0, 0.0, 0.0], "cone": [0.0, 0.0, -0.2],
            "torus": [toy_world.TORUS_MAJOR, 0.0, 0.0]}[shape]
  assert float(toy_world.shape_sdf(i, jnp.array(inside))) < 0
  assert float(toy_world.shape_sdf(i, jnp.array([0.0, 0.0, 0.9]))) > 0
  # A signed distance has unit gradient norm almost everywhere.
  x = jax.random.uniform(jax.random.PRNGKey(i), (256, 3), minval=-0.8, maxval=0.8)
  g = jax.vmap(jax.grad(lambda p: toy_world.shape_sdf(i, p)))(x)
  np.testing.assert_allclose(np.median(np.linalg.norm(g, axis=-1)), 1.0, atol=1e-3)


def test_sdf_closed_forms():
  assert float(toy_world.sdf_sphere(jnp.array([0.0, 0.6, 0.0]), 0.4)) == pytest.approx(0.2)
  assert float(toy_world.sdf_box(jnp.array([0.5, 0.0, 0.0]), 0.3)) == pytest.approx(0.2)
  assert float(toy_world.sdf_box(jnp.array([0.5, 0.5, 0.0]), 0.3)) == pytest.approx(np.sqrt(0.08), rel=1e-5)
  assert float(toy_world.sdf_torus(jnp.array([0.3, 0.0, 0.3]), 0.3, 0.1)) == pytest.approx(0.2, rel=1e-5)
  # Below the cone's base, straight down: the distance to the base plane.
  assert float(toy_world.sdf_cone(jnp.array([0.0, 0.0, -0.7]), 0.4, 0.4)) == pytest.approx(0.3, rel=1e-5)


def test_prompts_and_colours():
  assert toy_world.parse_prompt("a red cube, side view") == ("cube", "red")
  with pytest.raises(ValueError, match="one shape"):
    toy_world.parse_prompt("a red dog")
  for name, rgb in toy_world.COLORS.items():
    assert toy_world.closest_color(np.asarray(rgb) * 0.8 + 0.05) == name
  assert len(toy_world.all_prompts()) == 16


def test_rendered_objects_have_their_colour():
  shape = jnp.arange(4, dtype=jnp.int32)
  color = jnp.arange(4, dtype=jnp.int32)[::-1]
  out = jax.jit(lambda k: toy_world.render_objects(k, shape, color, size=16))(jax.random.PRNGKey(0))
  for i in range(4):
    mask = np.asarray(out["opacity"][i]) > 0.99
    assert mask.sum() > 10
    mean = np.asarray(out["image"][i])[mask].mean(axis=0)
    assert toy_world.closest_color(mean) == toy_world.COLOR_NAMES[int(color[i])]


@pytest.fixture(scope="module")
def random_prior(tmp_path_factory):
  path = toy_prior.write_prior_dir(tmp_path_factory.mktemp("prior") / "toy_prior", toy_prior.init_params(0))
  return toy_prior.load(path)


def test_pixel_space_prior_loads_without_vae(random_prior):
  guidance, params = random_prior
  assert guidance.vae is None and params["vae"] == {}
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  np.testing.assert_allclose(guidance.encode(params, images), images * 2 - 1, atol=1e-6)
  np.testing.assert_allclose(guidance.decode(params, images * 2 - 1), images, atol=1e-6)


def test_pixel_space_sds_gradient_is_twice_the_latent_gradient(random_prior):
  """x = 2 img - 1, so d loss / d img = 2 w(t) (eps_hat - eps) / B."""
  from dreamfusion_jax.guidance import conditioning, distill, methods

  guidance, params = random_prior
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  emb = guidance.encode_prompts(params, ["a red cube", ""])
  cond, uncond = jnp.broadcast_to(emb[0], (2,) + emb.shape[1:]), jnp.broadcast_to(emb[1], (2,) + emb.shape[1:])
  t = jnp.array([100, 700], jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(2), images.shape)
  pair, sds = conditioning.TextPair(cond=cond, uncond=uncond), methods.get("sds")
  g_img = jax.grad(lambda im: distill.latent_loss(
      guidance, sds, params, guidance.encode(params, im), pair, t, noise)[0])(images)
  g_lat = jax.grad(lambda x: distill.latent_loss(guidance, sds, params, x, pair, t, noise)[0])(images * 2 - 1)
  np.testing.assert_allclose(g_img, 2 * g_lat, rtol=1e-5, atol=1e-8)
  assert float(jnp.abs(g_lat).max()) > 0


def test_prompt_table_covers_views_and_dropout(random_prior):
  guidance, _ = random_prior
  table = toy_prior.prompt_table(guidance.tokenizer)
  assert table.ids.shape == (16, 5, toy_prior.MAX_LENGTH)
  assert len({tuple(r) for r in table.ids.reshape(-1, toy_prior.MAX_LENGTH)}) == 80  # all prompts distinct
  ids = toy_prior.sample_prompt_ids(jax.random.PRNGKey(0), jnp.asarray(table.ids), jnp.asarray(table.empty),
                                    jnp.zeros(4000, jnp.int32), jnp.full(4000, 2, jnp.int32), uncond_prob=0.1,
                                    view_prob=0.5)
  is_empty = np.all(np.asarray(ids) == table.empty, axis=-1)
  is_back = np.all(np.asarray(ids) == table.ids[0, 3], axis=-1)
  np.testing.assert_allclose([is_empty.mean(), is_back.mean()], [0.1, 0.45], atol=0.02)
