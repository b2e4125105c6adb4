"""Regularizers against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np

from dreamfusion_jax import losses


def test_orientation_loss_penalises_only_back_facing_normals():
  d = jnp.array([[0.0, 0.0, -1.0]])  # looking down
  facing = jnp.array([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
  away = jnp.array([[[0.0, 0.0, -1.0], [0.0, 0.6, -0.8]]])
  w = jnp.array([[0.5, 0.25]])
  assert float(losses.orientation_loss(w, facing, d)) == 0.0
  np.testing.assert_allclose(losses.orientation_loss(w, away, d), 0.5 * 1.0 + 0.25 * 0.8**2, rtol=1e-6)


def test_orientation_loss_does_not_differentiate_weights():
  d = jnp.array([[0.0, 0.0, -1.0]])
  n = jnp.array([[[0.0, 0.0, -1.0]]])
  grad = jax.grad(lambda w: losses.orientation_loss(w, n, d))(jnp.array([[0.7]]))
  assert float(jnp.abs(grad).sum()) == 0.0
  grad_n = jax.grad(lambda nn: losses.orientation_loss(jnp.array([[0.7]]), nn, d))(n)
  np.testing.assert_allclose(grad_n, [[[0.0, 0.0, -2 * 0.7 * 1.0]]], rtol=1e-6)


def test_opacity_and_entropy():
  o = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(losses.opacity_loss(o), np.mean(np.sqrt(np.array([0, 0.25, 1]) + 0.01)), rtol=1e-6)
  np.testing.assert_allclose(losses.opacity_entropy_loss(jnp.array([0.5])), np.log(2), rtol=1e-5)
  assert float(losses.opacity_entropy_loss(jnp.array([0.0, 1.0]))) < 1e-3


def test_ramped_weight():
  np.testing.assert_allclose([losses.ramped_weight(s, 2.0, 100) for s in (0, 50, 100, 400)], [0, 1, 2, 2])
  np.testing.assert_allclose(losses.ramped_weight(7, 3.0, 0), 3.0)
