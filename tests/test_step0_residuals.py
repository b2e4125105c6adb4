"""No behaviour change in the guidance: today's code against the step-0 fixtures of
the seams refactor (tests/fixtures/step0/README.md).

Every method x conditioning's residual on fixed inputs, and the whole guidance loss
(value, metrics, gradient w.r.t. the renders and VSD's LoRA) of fixed renders and keys,
on the tiny random Stable Diffusion and the two toy priors, equal to float32 round-off.
The fixtures hold the loss of every conditioning; the test compares the loss under
classifier-free guidance and the residual under both (Perp-Neg enters the loss only
through the residual), one compile each, to keep the suite's time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamfusion_jax import toy_prior, toy_zero123
from dreamfusion_jax.guidance import conditioning, distill, methods, prompts, tiny
from dreamfusion_jax.guidance.priors import stable_diffusion as sd
from step0 import FIXTURES, assert_close


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  return str(tiny.build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd"), seed=0))


def unflatten(arrays, prefix):
  """The nested dict stored under `prefix/` by write_step0.flatten."""
  out = {}
  for key, value in arrays.items():
    if key.startswith(prefix + "/"):
      node = out
      *parents, leaf = key[len(prefix) + 1:].split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = jnp.asarray(value)
  return out


def text_prior(name, method, tiny_sd):
  if name == "tiny_sd":
    return sd.load_stable_diffusion(tiny_sd, settings=sd.SDSSettings(image_size=tiny.TINY_IMAGE_SIZE,
                                                                     guidance_scale=7.5, method=method))
  return toy_prior.load(method=method, guidance_scale=20.0)


@pytest.mark.parametrize("prior", ["tiny_sd", "toy_text"])
@pytest.mark.parametrize("method", ["sds", "csd", "ism", "vsd"])
def test_text_prior_residual_and_loss_equal_step0(prior, method, tiny_sd):
  golden = dict(np.load(FIXTURES / f"residuals_{prior}.npz"))
  inputs = {k[len("inputs/"):]: jnp.asarray(v) for k, v in golden.items() if k.startswith("inputs/")}
  guidance, params = text_prior(prior, method, tiny_sd)
  # The fixture's embeddings are the prior's own: the text encoder is unchanged too.
  assert_close(prompts.make_prompt_embeddings(guidance, params, "a red cube", "", True).cond,
               golden["inputs/prompt_cond"], "prompt embeddings")
  emb = prompts.PromptEmbeddings(cond=inputs["prompt_cond"], uncond=inputs["prompt_uncond"])
  conds = {name: prompts.select_conditioning(emb, inputs["buckets"], inputs["azimuth_deg"], perp)
           for name, perp in (("cfg", False), ("perp_neg", True))}
  state = unflatten(golden, "inputs/vsd_state") if method == "vsd" else None
  m, s = methods.get(method), guidance.settings
  residuals = jax.jit(lambda l, n, t: {
      name: m.residual(guidance, params, l, cond, t, n, scale=s.guidance_scale, settings=s, state=state,
                       c2w=inputs["c2w"]) for name, cond in conds.items()})(
                           inputs["latents"], inputs["noise"], inputs["t"])
  for name, residual in residuals.items():
    want = golden[f"{method}/{name}/residual"]
    assert np.abs(want).max() > 1e-3  # a golden that can tell
    assert_close(residual, want, f"{prior} {method} {name}: residual")

  def loss_fn(images, st):
    return distill.loss(guidance, m, params, images, conds["cfg"], inputs["keys"], inputs["t_range"], state=st,
                        c2w=inputs["c2w"])

  (loss, metrics), (g_images, g_state) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      inputs["images"], state)
  where = f"{prior} {method} cfg"
  assert_close(loss, golden[f"{method}/cfg/loss"], f"{where}: loss")
  assert sorted(metrics) == sorted(k.split("/")[-1] for k in golden if k.startswith(f"{method}/cfg/metrics/"))
  for k, v in metrics.items():
    assert_close(v, golden[f"{method}/cfg/metrics/{k}"], f"{where}: metric {k}")
  assert_close(g_images, golden[f"{method}/cfg/grad_images"], f"{where}: d loss / d renders")
  if method == "vsd":
    want = unflatten(golden, f"{method}/cfg/grad_state")
    got, want = jax.tree_util.tree_flatten_with_path(g_state)[0], jax.tree_util.tree_leaves(want)
    assert len(got) == len(want)
    for (path, a), b in zip(got, want):
      assert_close(a, np.asarray(b), f"{where}: d loss / d LoRA {jax.tree_util.keystr(path)}")


def test_view_prior_residual_and_loss_equal_step0():
  golden = dict(np.load(FIXTURES / "residuals_toy_zero123.npz"))
  guidance, params = toy_zero123.load()
  inputs = {k[len("inputs/"):]: jnp.asarray(v) for k, v in golden.items() if k.startswith("inputs/")}
  encoded = guidance.encode_image(params, inputs["image"], (15.0, 0.0, 1.7))
  for k in ("embedding", "latents"):
    assert_close(jnp.broadcast_to(getattr(encoded, k), golden[f"inputs/cond/{k}"].shape),
                 golden[f"inputs/cond/{k}"], f"image conditioning {k}")
  cond = conditioning.ImageView(**unflatten(golden, "inputs/cond"), keep=jnp.ones((2,), jnp.float32))
  sds, s = methods.get("sds"), guidance.settings
  residual = jax.jit(lambda l, n, t: sds.residual(guidance, params, l, cond, t, n, scale=s.guidance_scale,
                                                  settings=s))(inputs["latents"], inputs["noise"], inputs["t"])
  assert_close(residual, golden["sds/image/residual"], "zero123 residual")
  (loss, metrics), g_images = jax.jit(jax.value_and_grad(
      lambda images: distill.loss(guidance, sds, params, images, cond, inputs["keys"], inputs["t_range"]),
      has_aux=True))(inputs["images"])
  assert_close(loss, golden["sds/image/loss"], "zero123 loss")
  for k, v in metrics.items():
    assert_close(v, golden[f"sds/image/metrics/{k}"], f"zero123 metric {k}")
  assert_close(g_images, golden["sds/image/grad_images"], "zero123 d loss / d renders")
