"""The 2D seam: frozen diffusion priors and the score-distillation methods.

  priors/            one module per prior (stable_diffusion, zero123), chosen by
                     config.guidance.prior; the contract in priors/__init__.py.
  methods/           one module per method (sds, csd, ism, vsd), chosen by
                     config.guidance.method; the contract in methods/__init__.py.
  distill.py         THE distillation loss, for every prior x method.
  conditioning.py    conditioning objects (TextPair, PerpNeg, ImageView) carrying their
                     own guidance direction; guided noise and DDIM sampling with a prior.
  diffusion.py       model-free math: schedules, q-sample, v->eps, CFG, w(t), DDIM.
  prompts.py         view-dependent prompts and their embeddings.
  perp_neg.py        Perp-Neg's weights and projection, on arrays.
  pipeline_dir.py, sd_models.py, char_tokenizer.py, weight_conversion.py, tiny.py
                     reading and writing checkpoint directories, building the Flax
                     modules, the tiny random models of tests and benchmarks.

A run (runs.setup_run) names its prior and its method by the config's fields
(`priors.get(config.guidance.prior)`, `methods.get(config.guidance.method)`), each
imported on first use (importing diffusers and transformers takes seconds, which the
math and the config checks need not pay).
"""

from dreamfusion_jax.guidance import methods, priors
from dreamfusion_jax.guidance.pipeline_dir import DEFAULT_MODEL, ModelNotFoundError


__all__ = ["DEFAULT_MODEL", "ModelNotFoundError", "methods", "priors"]
