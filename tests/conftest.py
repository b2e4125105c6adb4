"""The suite runs with the XLA CPU flags the scripts use (dreamfusion_jax.cli), set here
before any test starts JAX's backend; subprocesses inherit them."""

from dreamfusion_jax import cli

cli.apply_cpu_xla_flags()
