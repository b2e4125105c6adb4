"""dreamfusion-jax: text-to-3D by Score Distillation Sampling in JAX/Flax."""

__version__ = "0.1.0"
