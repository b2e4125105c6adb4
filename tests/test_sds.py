"""SDS math: closed-form checks of the schedule, noising, CFG, w(t) and the surrogate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax.guidance import diffusion


@pytest.fixture(scope="module")
def abar():
  return jnp.asarray(diffusion.ddpm_alphas_cumprod(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000))


def test_alphas_cumprod_linear_and_scaled_linear_closed_form():
  t = 50
  lin = diffusion.ddpm_alphas_cumprod(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=t)
  betas = 1e-4 + (0.02 - 1e-4) * np.arange(t) / (t - 1)
  np.testing.assert_allclose(lin, [np.prod(1 - betas[: i + 1]) for i in range(t)], rtol=1e-6)
  scaled = diffusion.ddpm_alphas_cumprod(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=t)
  root = np.sqrt(0.00085) + (np.sqrt(0.012) - np.sqrt(0.00085)) * np.arange(t) / (t - 1)
  np.testing.assert_allclose(scaled, np.cumprod(1 - root**2), rtol=1e-6)
  assert scaled.dtype == np.float32


def test_alphas_cumprod_cosine_telescopes():
  # Without the 0.999 cap the product telescopes: alpha_bar_t = f(t + 1) / f(0).
  t = 1000
  abar = diffusion.ddpm_alphas_cumprod(beta_start=0.0, beta_end=0.0, beta_schedule="squaredcos_cap_v2",
                                 num_train_timesteps=t)
  f = lambda s: np.cos((s / t + 0.008) / 1.008 * np.pi / 2) ** 2
  uncapped = np.arange(t) < t - 5  # the last betas hit the cap
  np.testing.assert_allclose(abar[uncapped], (f(np.arange(1, t + 1)) / f(0))[uncapped], rtol=1e-5, atol=1e-7)


def test_alphas_cumprod_rejects_unknown_schedule():
  with pytest.raises(ValueError, match="sigmoid"):
    diffusion.ddpm_alphas_cumprod(beta_start=0.1, beta_end=0.2, beta_schedule="sigmoid", num_train_timesteps=10)


def test_sample_timesteps_covers_the_range_and_does_not_recompile():
  traces = []

  @jax.jit
  def sample(key, t_range):
    traces.append(None)
    return diffusion.sample_timesteps(key, 4096, t_range[0], t_range[1], 1000)

  t = np.asarray(sample(jax.random.PRNGKey(0), jnp.array([0.02, 0.98])))
  assert t.dtype == np.int32
  assert t.min() == 20 and t.max() == 980  # both ends are reachable, nothing outside
  assert abs(t.mean() - 500) < 15
  t = np.asarray(sample(jax.random.PRNGKey(1), jnp.array([0.5, 0.5])))
  np.testing.assert_array_equal(t, 500)
  t = np.asarray(sample(jax.random.PRNGKey(2), jnp.array([0.0, 1.0])))
  assert t.min() >= 0 and t.max() <= 999
  assert len(traces) == 1  # annealing t_range is a new value, not a new program


def test_add_noise_closed_form(abar):
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (3, 4, 4, 2))
  eps = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  t = jnp.array([0, 500, 999])
  got = diffusion.add_noise(abar, x, eps, t)
  for i in range(3):
    a = float(abar[t[i]])
    np.testing.assert_allclose(got[i], np.sqrt(a) * x[i] + np.sqrt(1 - a) * eps[i], rtol=1e-5, atol=1e-6)


def test_epsilon_from_v_inverts_the_v_parameterisation(abar):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 4))
  eps = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  t = jnp.array([10, 400, 950])
  a = abar[t][:, None, None, None]
  v = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x
  np.testing.assert_allclose(diffusion.epsilon_from_v(abar, v, diffusion.add_noise(abar, x, eps, t), t), eps, atol=1e-5)


@pytest.mark.parametrize("clip_x0", [None, 1.0])
def test_ddim_step_with_the_true_noise_lands_on_the_noised_x0(abar, clip_x0):
  # With eps equal to the noise that made x_t, DDIM recovers x0 exactly and re-noises
  # it with the same eps at t_prev (Song et al. eq. 12, eta = 0).
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3), minval=-1.0, maxval=1.0)
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t, t_prev = jnp.int32(700), jnp.int32(300)
  x_t = diffusion.add_noise(abar, x0, eps, jnp.full((2,), t))
  got = diffusion.ddim_step(abar, x_t, eps, t, t_prev, clip_x0)
  np.testing.assert_allclose(got, diffusion.add_noise(abar, x0, eps, jnp.full((2,), t_prev)), atol=1e-5)
  np.testing.assert_allclose(diffusion.ddim_step(abar, x_t, eps, t, jnp.int32(-1), clip_x0), x0, atol=1e-4)


def test_ddim_step_clips_x0_and_rederives_eps(abar):
  x0 = jnp.array([-3.0, -0.5, 0.25, 2.0]).reshape(1, 2, 2, 1)
  eps = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
  t = jnp.int32(500)
  x_t = diffusion.add_noise(abar, x0, eps, jnp.full((1,), t))
  clipped = jnp.clip(x0, -1.0, 1.0)
  # The last step returns the clipped x0; an intermediate step re-noises it with the
  # eps consistent with x_t, so the step stays on the line through x_t and clipped x0.
  np.testing.assert_allclose(diffusion.ddim_step(abar, x_t, eps, t, jnp.int32(-1), 1.0), clipped, atol=1e-5)
  a, ap = float(abar[500]), float(abar[100])
  eps_c = (x_t - np.sqrt(a) * clipped) / np.sqrt(1 - a)
  np.testing.assert_allclose(diffusion.ddim_step(abar, x_t, eps, t, jnp.int32(100), 1.0),
                             np.sqrt(ap) * clipped + np.sqrt(1 - ap) * eps_c, rtol=1e-5, atol=1e-5)
  # Without clipping the out-of-range x0 comes back unchanged.
  np.testing.assert_allclose(diffusion.ddim_step(abar, x_t, eps, t, jnp.int32(-1)), x0, atol=1e-4)


def test_classifier_free_guidance_by_hand():
  u = np.array([[1.0, -2.0], [0.5, 0.0]], np.float32)
  c = np.array([[3.0, 2.0], [0.5, -1.0]], np.float32)
  np.testing.assert_allclose(diffusion.classifier_free_guidance(u, c, 100.0), [[201.0, 398.0], [0.5, -100.0]])
  np.testing.assert_allclose(diffusion.classifier_free_guidance(u, c, 1.0), c)
  np.testing.assert_allclose(diffusion.classifier_free_guidance(u, c, 0.0), u)


@pytest.mark.parametrize("kind,expected", [
    ("sds", lambda a: 1 - a),
    ("uniform", lambda a: np.ones_like(a)),
    ("fantasia3d", lambda a: np.sqrt(a) * (1 - a)),
])
def test_sds_weight_closed_forms(abar, kind, expected):
  t = jnp.array([0, 20, 500, 980, 999])
  np.testing.assert_allclose(diffusion.sds_weight(abar, t, kind), expected(np.asarray(abar)[np.asarray(t)]), rtol=1e-6)


def test_sds_weight_rejects_unknown_kind(abar):
  with pytest.raises(ValueError, match="known"):
    diffusion.sds_weight(abar, jnp.array([1]), "sigma")


def test_sds_gradient_weights_zeroes_non_finite_and_clips():
  eps_hat = jnp.array([[1.0, np.nan, 3.0], [np.inf, -4.0, 0.5]])
  noise = jnp.array([[0.5, 0.0, -1.0], [0.0, 1.0, 0.5]])
  w = jnp.array([2.0, 0.5])
  np.testing.assert_allclose(diffusion.sds_gradient(eps_hat, noise, w), [[1.0, 0.0, 8.0], [0.0, -2.5, 0.0]])
  np.testing.assert_allclose(diffusion.sds_gradient(eps_hat, noise, w, grad_clip=2.0), [[1.0, 0.0, 2.0], [0.0, -2.0, 0.0]])
  np.testing.assert_allclose(diffusion.sds_gradient(eps_hat, noise, w, grad_clip=0.0), [[1.0, 0.0, 8.0], [0.0, -2.5, 0.0]])


@pytest.mark.parametrize("batch", [1, 3])
def test_surrogate_gradient_is_the_sds_gradient(batch):
  z = 5.0 * jax.random.normal(jax.random.PRNGKey(0), (batch, 8, 8, 4))
  g = jax.random.normal(jax.random.PRNGKey(1), z.shape)
  loss, dz = jax.value_and_grad(diffusion.sds_surrogate_loss)(z, g)
  np.testing.assert_allclose(dz, g / batch, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * np.sum(np.square(g)) / batch, rtol=1e-5)


def test_surrogate_gradient_flows_through_an_encoder_by_the_chain_rule():
  # z = images @ A (a linear "encoder"): d loss / d images = g A^T / B.
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 6, 3))
  a = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  g = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 4))
  d_images = jax.grad(lambda x: diffusion.sds_surrogate_loss(x @ a, g))(images)
  np.testing.assert_allclose(d_images, np.einsum("bpk,jk->bpj", g, a) / 2, rtol=1e-5, atol=1e-6)
