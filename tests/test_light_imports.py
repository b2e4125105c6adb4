"""Parsing a config and importing the light modules pays for no model library:
diffusers and transformers take seconds to import (docs/architecture.md)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHECK = """
import sys
{imports}
heavy = sorted(m for m in ("diffusers", "transformers", "torch") if m in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize("imports", [
    "from configs import toy; toy.get_config()",
    "from configs import dreamfusion; dreamfusion.get_config()",
    "from dreamfusion_jax import toy_prior",
    "from dreamfusion_jax.guidance import char_tokenizer, pipeline_dir, diffusion, prompts, conditioning, distill",
    "from dreamfusion_jax.guidance import settings; from dreamfusion_jax.guidance.methods import sds, csd, ism, vsd",
    "from dreamfusion_jax import runs",
    "import dreamfusion_jax.guidance as g; g.ModelNotFoundError, g.DEFAULT_MODEL",
])
def test_imports_without_model_libraries(imports):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", _CHECK.format(imports=imports)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


def test_the_check_sees_a_model_library():
  """The check above can fail: importing the Stable Diffusion guidance loads diffusers."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  code = _CHECK.format(imports="from dreamfusion_jax.guidance.priors import stable_diffusion")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0 and "diffusers" in result.stderr
