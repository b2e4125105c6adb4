"""Stable Diffusion guidance on a tiny random model: loading, prompts, SDS, PyTorch parity.

One tiny model set is built per module (no network); everything loads through the
real loading path. The parity tests need torch (CPU) and are skipped without it.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from dreamfusion_jax.guidance import conditioning, distill, methods
from dreamfusion_jax.guidance import prompts as prompts_lib
from dreamfusion_jax.guidance import diffusion
from dreamfusion_jax.guidance.priors import stable_diffusion as sd
from dreamfusion_jax.guidance import tiny
from dreamfusion_jax.guidance import weight_conversion

SETTINGS = sd.SDSSettings(image_size=tiny.TINY_IMAGE_SIZE, guidance_scale=7.5)


@pytest.fixture(scope="module", autouse=True)
def full_float32_matmuls():
  """GPUs would run float32 matmuls in TF32 by default, beyond the tolerances here."""
  with jax.default_matmul_precision("highest"):
    yield


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(dict(tree)))


@pytest.fixture(scope="module")
def saved():
  """The random params written into both tiny directories."""
  return tiny.tiny_params(seed=0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, saved):
  root = tmp_path_factory.mktemp("tiny_sd")
  return {fmt: tiny.write_pipeline_dir(root / fmt, saved, fmt=fmt) for fmt in ("flax", "safetensors")}


@pytest.fixture(scope="module")
def loaded(dirs):
  return sd.load_stable_diffusion(str(dirs["safetensors"]), settings=SETTINGS)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["flax", "safetensors"])
def test_loaded_params_equal_saved_params(dirs, saved, fmt):
  guidance, params = sd.load_stable_diffusion(str(dirs[fmt]), settings=SETTINGS)
  for name in ("unet", "vae", "text_encoder"):
    got, want = _flat(params[name]), _flat(saved[name])
    assert got.keys() == want.keys()
    for k in want:
      assert got[k].dtype == np.float32
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}/{'/'.join(k)}")
  assert params["alphas_cumprod"].shape == (1000,)
  assert guidance.num_train_timesteps == 1000 and guidance.latent_size == tiny.TINY_IMAGE_SIZE // 2


def test_tiny_flax_files_are_what_diffusers_and_transformers_read(dirs, saved):
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top

  _, unet_params = FlaxUNet2DConditionModel.from_pretrained(str(dirs["flax"]), subfolder="unet")
  _, text_params = FlaxCLIPTextModel.from_pretrained(str(dirs["flax"] / "text_encoder"), _do_init=False)
  for got, want in ((unet_params, saved["unet"]), (text_params, saved["text_encoder"])):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_bfloat16_weights_keep_a_float32_schedule(dirs, loaded, sds_case):
  guidance, params = sd.load_stable_diffusion(str(dirs["flax"]), dtype="bfloat16", settings=SETTINGS)
  dtypes = {a.dtype for a in jax.tree.leaves([params["unet"], params["vae"], params["text_encoder"]])}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  assert params["alphas_cumprod"].dtype == jnp.float32
  c = sds_case
  got = jax.jit(lambda p: sd.predict_noise(guidance, p, c["unet_x"], c["unet_t"], c["unet_emb"]))(params)
  assert got.dtype == jnp.float32
  ref = jnp.concatenate([c["eps_u"], c["eps_c"]])
  assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.05


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_matches_diffusers_scheduler(schedule):
  from diffusers import FlaxDDPMScheduler  # pylint: disable=g-import-not-at-top

  config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule, num_train_timesteps=1000)
  ref = FlaxDDPMScheduler.from_config(config).create_state().common.alphas_cumprod
  np.testing.assert_allclose(diffusion.ddpm_alphas_cumprod(**config), ref, rtol=2e-5, atol=1e-7)


def test_pytorch_names_round_trip_including_legacy_vae_attention(saved):
  _, vae_shapes = sd.vae_from_config(tiny.TINY_VAE_CONFIG)
  state = weight_conversion.flax_to_pytorch(saved["vae"])
  # Older diffusers checkpoints name the VAE attention query/key/value/proj_attn and
  # some store them as 1x1 convolutions.
  legacy = {}
  for k, v in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        v = v[:, :, None, None] if v.ndim == 2 else v
    legacy[k] = v
  assert legacy.keys() != state.keys()
  for s in (state, legacy):
    got, want = _flat(weight_conversion.pytorch_to_flax(s, vae_shapes)), _flat(saved["vae"])
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_weight_mismatch_lists_missing_unexpected_and_misshaped_tensors(dirs, tmp_path):
  broken = shutil.copytree(dirs["safetensors"], tmp_path / "broken")
  path = broken / "unet" / "diffusion_pytorch_model.safetensors"
  state = safetensors.numpy.load_file(str(path))
  del state["conv_in.bias"]
  state["extra_block.weight"] = np.zeros(3, np.float32)
  state["conv_out.weight"] = np.zeros((4, 32, 5, 5), np.float32)
  safetensors.numpy.save_file(state, str(path))
  with pytest.raises(weight_conversion.WeightMismatchError) as err:
    sd.load_stable_diffusion(str(broken), settings=SETTINGS)
  msg = str(err.value)
  assert "conv_in/bias" in msg and "extra_block.weight" in msg and "conv_out.weight (4, 32, 5, 5)" in msg
  assert str(path) in msg


_LOAD_WITHOUT_TORCH = """
import importlib.abc, importlib.machinery, sys

class _NoTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] == "torch" else None
  def create_module(self, spec):
    raise ImportError("torch is blocked in this process")
  def exec_module(self, module):
    pass

sys.meta_path.insert(0, _NoTorch())
from dreamfusion_jax.guidance.priors import stable_diffusion as sd
guidance, params = sd.load_stable_diffusion(sys.argv[1], settings=sd.SDSSettings(image_size=32))
assert params["unet"]["conv_in"]["kernel"].shape == (3, 3, 4, 32)
"""


def test_safetensors_load_without_torch(dirs):
  # diffusers imports torch whenever it is installed; USE_TORCH=0 stops that, and
  # the blocker fails any import of torch by our loading path.
  env = dict(os.environ, USE_TORCH="0", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_TORCH, str(dirs["safetensors"])], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


# ----------------------------------------------------------------------------- errors


def _assert_clear_not_found(err, name):
  msg = str(err.value)
  assert name in msg
  assert "huggingface-cli download" in msg and "--config.guidance.model=DIR" in msg and "configs/toy.py" in msg
  # Python prints no chained "During handling of the above exception" trace.
  assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


@pytest.fixture
def no_model_building(monkeypatch):
  """Fails the test if a model is built: errors must come before any compilation."""

  def forbidden(*args, **kwargs):
    raise AssertionError("a model was built before the missing files were reported")

  for name in ("unet_from_config", "vae_from_config", "text_encoder_from_config"):
    monkeypatch.setattr(sd, name, forbidden)


def test_missing_local_directory(tmp_path, no_model_building):
  missing = str(tmp_path / "no_such_model")
  with pytest.raises(sd.ModelNotFoundError) as err:
    sd.load_stable_diffusion(missing)
  _assert_clear_not_found(err, missing)


def test_hub_id_not_in_cache(tmp_path, monkeypatch, no_model_building):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(sd.ModelNotFoundError) as err:
    sd.load_stable_diffusion("nonexistent-org/nonexistent-model", cache_dir=tmp_path)
  _assert_clear_not_found(err, "nonexistent-org/nonexistent-model")
  with pytest.raises(sd.ModelNotFoundError) as err:  # the default cache, offline
    sd.load_stable_diffusion("nonexistent-org/nonexistent-model")
  _assert_clear_not_found(err, "nonexistent-org/nonexistent-model")


def test_incomplete_directory_names_the_missing_files(dirs, tmp_path, no_model_building):
  broken = shutil.copytree(dirs["flax"], tmp_path / "broken")
  (broken / "vae" / "diffusion_flax_model.msgpack").unlink()
  shutil.rmtree(broken / "tokenizer")
  with pytest.raises(sd.ModelNotFoundError) as err:
    sd.load_stable_diffusion(str(broken))
  _assert_clear_not_found(err, str(broken))
  assert "vae/{diffusion_flax_model.msgpack" in str(err.value) and "tokenizer/vocab.json" in str(err.value)


def test_from_config_reads_the_guidance_section(dirs):
  cfg = ml_collections.ConfigDict(dict(
      model=str(dirs["flax"]), dtype="float32", guidance_scale=20.0, weighting="uniform", grad_clip=0.0,
      image_size=32, sample_posterior=True, t_min=0.1, t_max=0.7, negative_prompt="blurry", view_dependent=False,
      t_max_end=0.5, t_anneal_steps=100))
  guidance, params = sd.from_config(cfg)
  assert guidance.settings == sd.SDSSettings(guidance_scale=20.0, weighting="uniform", grad_clip=None,
                                             image_size=32, sample_posterior=True, t_min=0.1, t_max=0.7)
  assert set(params) == {"unet", "vae", "text_encoder", "alphas_cumprod"}
  with pytest.raises(ValueError, match="weighting"):  # validated before looking for the model
    sd.from_config(ml_collections.ConfigDict(dict(model="/nonexistent", weighting="sigma")))
  with pytest.raises(ValueError, match="image_size=34"):
    sd.from_config(ml_collections.ConfigDict(dict(model=str(dirs["flax"]), image_size=34)))


# ----------------------------------------------------------------------------- prompts


def test_view_suffixes_follow_the_camera_buckets():
  from dreamfusion_jax import cameras  # in-repo: an import failure must fail the test, not skip it
  assert [s.removeprefix(", ").removesuffix(" view") for s in prompts_lib.VIEW_SUFFIXES] == list(cameras.VIEW_BUCKETS)


def test_view_dependent_prompt_embeddings_and_selection(loaded):
  guidance, params = loaded
  pe = prompts_lib.make_prompt_embeddings(guidance, params, "a corgi", negative_prompt="ugly")
  assert pe.cond.shape == (4, tiny.TINY_MAX_LENGTH, 32) and pe.uncond.shape == (tiny.TINY_MAX_LENGTH, 32)
  singles = [guidance.encode_prompts(params, [p])[0] for p in
             ("a corgi, front view", "a corgi, side view", "a corgi, back view", "a corgi, overhead view", "ugly")]
  for i in range(4):
    np.testing.assert_allclose(pe.cond[i], singles[i], atol=1e-5)
  np.testing.assert_allclose(pe.uncond, singles[4], atol=1e-5)
  assert float(jnp.abs(pe.cond[0] - pe.cond[2]).max()) > 1e-3  # the suffix changes the embedding

  plain = prompts_lib.make_prompt_embeddings(guidance, params, "a corgi", view_dependent=False)
  np.testing.assert_allclose(plain.cond, np.broadcast_to(guidance.encode_prompts(params, ["a corgi"]), (4, 77, 32)),
                             atol=1e-5)
  np.testing.assert_allclose(plain.uncond, guidance.encode_prompts(params, [""])[0], atol=1e-5)

  buckets = jnp.array([2, 0, 3, 3, 1], jnp.int32)
  cond, uncond = jax.jit(prompts_lib.select_embeddings)(pe, buckets)
  np.testing.assert_array_equal(cond, np.asarray(pe.cond)[[2, 0, 3, 3, 1]])
  np.testing.assert_array_equal(uncond, np.broadcast_to(pe.uncond, (5, 77, 32)))


# ----------------------------------------------------------------------------- SDS


@pytest.fixture(scope="module")
def sds_case(loaded):
  """Fixed latents, t, noise and embeddings, with the UNet's two predictions.

  `predict` is one jitted UNet call on a doubled batch of 2; tests reuse it (same
  shapes, no new compilation) for their references.
  """
  guidance, params = loaded
  emb = guidance.encode_prompts(params, ["a corgi, side view", "a corgi, back view", ""])
  cond, uncond = emb[:2], jnp.stack([emb[2], emb[2]])
  latents = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 4))
  t = jnp.array([100, 850], jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(1), latents.shape)
  predict_fn = jax.jit(lambda p, x, t, e: sd.predict_noise(guidance, p, x, t, e))

  def predict(noisy, t):
    """(eps_uncond, eps_cond), each (2, 16, 16, 4)."""
    eps = predict_fn(params, jnp.concatenate([noisy, noisy]), jnp.concatenate([t, t]),
                     jnp.concatenate([uncond, cond]))
    return eps[:2], eps[2:]

  def predict_with(noisy, t, cond_emb):
    """(eps_uncond, eps_cond) with another (2, L, D) conditional embedding."""
    eps = predict_fn(params, jnp.concatenate([noisy, noisy]), jnp.concatenate([t, t]),
                     jnp.concatenate([uncond, cond_emb]))
    return eps[:2], eps[2:]

  noisy = diffusion.add_noise(params["alphas_cumprod"], latents, noise, t)
  eps_u, eps_c = predict(noisy, t)
  return dict(cond=cond, uncond=uncond, latents=latents, t=t, noise=noise, noisy=noisy, eps_u=eps_u, eps_c=eps_c,
              predict=predict, predict_with=predict_with, unet_x=jnp.concatenate([noisy, noisy]), unet_t=jnp.concatenate([t, t]),
              unet_emb=jnp.concatenate([uncond, cond]))


def _pair(c):
  return conditioning.TextPair(cond=c["cond"], uncond=c["uncond"])


def _latent_loss(guidance, params, z, c, method="sds", **kwargs):
  """distill.latent_loss of the sds_case's latents, t and noise under its prompt pair."""
  return distill.latent_loss(guidance, methods.get(method), params, z, _pair(c), c["t"], c["noise"], **kwargs)


def test_guided_noise_is_cfg_of_the_two_predictions(loaded, sds_case):
  guidance, params = loaded
  c = sds_case
  got = jax.jit(lambda p: conditioning.guided_noise(guidance, p, c["noisy"], c["t"], _pair(c), 7.5))(params)
  want = np.asarray(c["eps_u"]) + 7.5 * (np.asarray(c["eps_c"]) - np.asarray(c["eps_u"]))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(c["eps_c"] - c["eps_u"]).max()) > 1e-3  # the prompt matters to the UNet


def test_latent_gradient_is_weighted_noise_residual(loaded, sds_case):
  guidance, params = loaded
  c = sds_case
  grad_fn = jax.jit(jax.grad(lambda z, p: _latent_loss(guidance, p, z, c)[0]))
  got = grad_fn(c["latents"], params)
  eps_hat = c["eps_u"] + 7.5 * (c["eps_c"] - c["eps_u"])
  w = 1.0 - params["alphas_cumprod"][c["t"]]
  want = w[:, None, None, None] * (eps_hat - c["noise"]) / 2  # batch mean
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _replay_t_and_noise(guidance, key, t_range, shape):
  """The t and noise distill.loss draws from `key` (its documented split: t, noise, posterior)."""
  k_t, k_noise, k_posterior = jax.random.split(key, 3)
  t = diffusion.sample_timesteps(k_t, shape[0], t_range[0], t_range[1], guidance.num_train_timesteps)
  return t, jax.random.normal(k_noise, shape), k_posterior


def test_image_gradient_is_sds_gradient_through_the_vae_encoder(loaded, sds_case):
  guidance, params = loaded
  c = sds_case
  images = jax.random.uniform(jax.random.PRNGKey(3), (2, 24, 24, 3))  # resized to 32 inside
  key, t_range = jax.random.PRNGKey(4), jnp.array([0.2, 0.9])
  traces = []

  def loss(x, p, key, t_range):
    traces.append(None)
    return distill.loss(guidance, methods.get("sds"), p, x, _pair(c), key, t_range)

  loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (value, metrics), got = loss_and_grad(images, params, key, t_range)

  @jax.jit
  def encode_and_pull_back(p, x, t_range):
    """The reference: latents, t, noise as distill.loss draws them; the encoder's VJP."""
    latents, encoder_vjp = jax.vjp(lambda x: sd.encode_images(guidance, p["vae"], x), x)
    t, noise, _ = _replay_t_and_noise(guidance, key, t_range, latents.shape)
    return latents, t, noise, encoder_vjp

  latents, t, noise, encoder_vjp = encode_and_pull_back(params, images, t_range)
  eps_u, eps_c = c["predict"](diffusion.add_noise(params["alphas_cumprod"], latents, noise, t), t)
  g = diffusion.sds_gradient(diffusion.classifier_free_guidance(eps_u, eps_c, 7.5), noise,
                       diffusion.sds_weight(params["alphas_cumprod"], t, "sds"))
  (want,) = jax.jit(lambda ct: encoder_vjp(ct))(g / 2)
  assert got.shape == images.shape and float(jnp.abs(want).max()) > 0
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.abs(want).max()))
  np.testing.assert_allclose(value, 0.5 * jnp.sum(g**2) / 2, rtol=1e-4)
  np.testing.assert_allclose(metrics["timestep"], jnp.mean(t) / 1000, rtol=1e-6)
  assert 0.2 <= float(metrics["timestep"]) <= 0.9
  # Annealing t_range feeds a new value to a traced argument: no new trace or compile.
  loss_and_grad(images, params, key, jnp.array([0.5, 0.6]))
  assert len(traces) == 1


def test_latent_gradient_is_clipped_elementwise(loaded, sds_case):
  guidance, params = loaded
  c = sds_case
  clipped = dataclasses.replace(guidance, settings=dataclasses.replace(SETTINGS, grad_clip=0.05))
  got = jax.jit(jax.grad(lambda z, p: _latent_loss(clipped, p, z, c)[0]))(c["latents"], params)
  w = (1.0 - params["alphas_cumprod"][c["t"]])[:, None, None, None]
  want = np.clip(w * (c["eps_u"] + 7.5 * (c["eps_c"] - c["eps_u"]) - c["noise"]), -0.05, 0.05) / 2
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  assert np.mean(np.abs(np.asarray(want)) == 0.025) > 0.01  # the clip was active


# ----------------------------------------------------------------------------- PyTorch parity


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
  """PyTorch diffusers/transformers models with perturbed random weights, saved by
  their own save_pretrained (PyTorch safetensors) into a diffusers-layout directory."""
  torch = pytest.importorskip("torch", exc_type=ImportError)
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**tiny.TINY_UNET_CONFIG).eval()
  vae = diffusers.AutoencoderKL(**tiny.TINY_VAE_CONFIG).eval()
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny.tiny_text_encoder_config())).eval()
  with torch.no_grad():  # default inits leave norms at 1/0 and some layers at 0
    for model in (unet, vae, text):
      for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("torch_sd")
  unet.save_pretrained(root / "unet", safe_serialization=True)
  vae.save_pretrained(root / "vae", safe_serialization=True)
  text.save_pretrained(root / "text_encoder", safe_serialization=True)
  tiny.write_tokenizer(root / "tokenizer")
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.TINY_SCHEDULER_CONFIG))
  guidance, params = sd.load_stable_diffusion(str(root), settings=SETTINGS)
  return dict(torch=torch, unet=unet, vae=vae, text=text, guidance=guidance, params=params)


def _relative_error(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def test_unet_matches_pytorch(torch_models):
  torch, guidance, params = torch_models["torch"], torch_models["guidance"], torch_models["params"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  t = np.array([10, 700], np.int32)
  emb = rng.standard_normal((2, 77, 32)).astype(np.float32)
  ours = jax.jit(lambda p: sd.predict_noise(guidance, p, x, t, emb))(params)

  def reference():
    with torch.no_grad():
      out = torch_models["unet"](torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long(),
                                 torch.from_numpy(emb)).sample
    return out.permute(0, 2, 3, 1).numpy()

  # diffusers' Flax GEGLU uses the tanh approximation of GELU, its PyTorch GEGLU the
  # exact one: a ~1e-4 difference that is the library's, not the weight mapping's.
  assert _relative_error(ours, reference()) < 1e-3
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from diffusers.models.activations import GEGLU  # pylint: disable=g-import-not-at-top

  for module in torch_models["unet"].modules():
    if isinstance(module, GEGLU):
      module.gelu = lambda gate: F.gelu(gate, approximate="tanh")
  assert _relative_error(ours, reference()) < 1e-4


def test_vae_latents_match_pytorch(torch_models):
  torch, guidance, params = torch_models["torch"], torch_models["guidance"], torch_models["params"]
  images = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  ours = jax.jit(lambda p: sd.encode_images(guidance, p["vae"], images))(params)
  with torch.no_grad():
    ref = torch_models["vae"].encode(torch.from_numpy(images * 2 - 1).permute(0, 3, 1, 2)).latent_dist.mean
  assert _relative_error(ours, ref.permute(0, 2, 3, 1).numpy() * 0.18215) < 1e-4


def test_text_encoder_matches_pytorch(torch_models):
  torch, guidance, params = torch_models["torch"], torch_models["guidance"], torch_models["params"]
  texts = ["a corgi, overhead view", ""]
  ours = guidance.encode_prompts(params, texts)
  ids = guidance.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
  with torch.no_grad():
    ref = torch_models["text"](ids).last_hidden_state.numpy()
  assert _relative_error(ours, ref) < 1e-4


def test_inverse_mapping_reproduces_pytorch_state_dicts(torch_models):
  for name, model in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text")):
    want = {k: v.numpy() for k, v in torch_models[model].state_dict().items() if not k.endswith("position_ids")}
    got = weight_conversion.flax_to_pytorch(jax.device_get(torch_models["params"][name]))
    assert got.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_sd1_style_conv_projections_map(torch_models):
  """SD 1.x UNets use 1x1 convs for the transformer proj_in/out (4-d weights)."""
  import diffusers  # pylint: disable=g-import-not-at-top

  config = dict(tiny.TINY_UNET_CONFIG, use_linear_projection=False)
  state = {k: v.numpy() for k, v in diffusers.UNet2DConditionModel(**config).state_dict().items()}
  assert state["down_blocks.0.attentions.0.proj_in.weight"].ndim == 4
  _, shapes = sd.unet_from_config(config)
  params = weight_conversion.pytorch_to_flax(state, shapes)
  np.testing.assert_array_equal(params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"],
                                state["down_blocks.0.attentions.0.proj_in.weight"].transpose(2, 3, 1, 0))


# ----------------------------------------------------------------------------- the methods (guidance/methods/)

def _with_method(guidance, **settings):
  return dataclasses.replace(guidance, settings=dataclasses.replace(guidance.settings, **settings))


def _latent_grad(guidance, params, c):
  fn = jax.jit(jax.grad(lambda z, p: _latent_loss(guidance, p, z, c, guidance.settings.method)[0]))
  return np.asarray(fn(c["latents"], params))


def test_csd_gradient_is_the_cfg_difference_term(loaded, sds_case):
  guidance, params = loaded
  c = sds_case
  got = _latent_grad(_with_method(guidance, method="csd"), params, c)
  w = np.asarray(1.0 - params["alphas_cumprod"][c["t"]])[:, None, None, None]
  want = w * 7.5 * (np.asarray(c["eps_c"]) - np.asarray(c["eps_u"])) / 2  # batch mean
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # SDS = CSD + the denoising residual w (eps_u - eps).
  sds_grad = _latent_grad(guidance, params, c)
  np.testing.assert_allclose(sds_grad - got, w * (np.asarray(c["eps_u"]) - np.asarray(c["noise"])) / 2,
                             rtol=1e-4, atol=1e-5)


def _ddim(abar_from, abar_to, x, eps):
  """One DDIM (eta 0) move, written out independently of ism.ddim_move."""
  a_f, a_t = np.asarray(abar_from)[:, None, None, None], np.asarray(abar_to)[:, None, None, None]
  return np.sqrt(a_t) * (np.asarray(x) - np.sqrt(1 - a_f) * np.asarray(eps)) / np.sqrt(a_f) + np.sqrt(1 - a_t) * eps


def test_ism_with_no_interval_and_one_inversion_step_is_csd_at_the_inverted_latents(loaded, sds_case):
  """delta = 0, 1 step: z_s = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps_u(z_0, 0), z_t = z_s,
  residual = eps_hat(z_s, t) - eps_u(z_s, t) = s (eps_c - eps_u) at z_s."""
  guidance, params = loaded
  c = sds_case
  got = _latent_grad(_with_method(guidance, method="ism", ism_delta_t=0, ism_inv_steps=1), params, c)
  abar = np.asarray(params["alphas_cumprod"])[np.asarray(c["t"])]
  eps0, _ = c["predict"](c["latents"], jnp.zeros_like(c["t"]))
  z_s = np.sqrt(abar)[:, None, None, None] * np.asarray(c["latents"]) + np.sqrt(1 - abar)[:, None, None, None] * eps0
  eps_u, eps_c = c["predict"](jnp.asarray(z_s, jnp.float32), c["t"])
  want = (1 - abar)[:, None, None, None] * 7.5 * (np.asarray(eps_c) - np.asarray(eps_u)) / 2
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_ism_gradient_matches_a_step_by_step_inversion(loaded, sds_case):
  guidance, params = loaded
  c = sds_case
  delta, steps = 50, 3
  got = _latent_grad(_with_method(guidance, method="ism", ism_delta_t=delta, ism_inv_steps=steps), params, c)
  table = np.asarray(params["alphas_cumprod"])
  t = np.asarray(c["t"])
  s = np.maximum(t - delta, 0)
  levels = [np.full_like(t, -1)] + [(i * s) // steps for i in range(1, steps + 1)]  # -1: the clean latents
  abar = lambda k: np.where(k < 0, 1.0, table[np.maximum(k, 0)])
  z = np.asarray(c["latents"])
  for a, b in zip(levels[:-1], levels[1:]):
    eps_u, _ = c["predict"](jnp.asarray(z, jnp.float32), jnp.asarray(np.maximum(a, 0), jnp.int32))
    z = _ddim(abar(a), abar(b), z, np.asarray(eps_u))
  eps_s, _ = c["predict"](jnp.asarray(z, jnp.float32), jnp.asarray(s, jnp.int32))
  z_t = _ddim(abar(s), abar(t), z, np.asarray(eps_s))
  eps_u, eps_c = c["predict"](jnp.asarray(z_t, jnp.float32), c["t"])
  eps_hat = np.asarray(eps_u) + 7.5 * (np.asarray(eps_c) - np.asarray(eps_u))
  want = (1 - table[t])[:, None, None, None] * (eps_hat - np.asarray(eps_s)) / 2
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
  # Not SDS's gradient: the target is the inverted prediction, not the drawn noise.
  assert np.abs(got - _latent_grad(guidance, params, c)).max() > 1e-2


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="guidance.method='vsdd'"):
    methods.get("vsdd")


def test_perp_neg_guided_noise_matches_an_independent_computation(loaded, sds_case):
  from dreamfusion_jax.guidance import perp_neg

  guidance, params = loaded
  c = sds_case
  emb = guidance.encode_prompts(params, ["a corgi, front view", "a corgi, side view"])
  neg = jnp.stack([jnp.stack([emb[0], emb[1]])] * 2)  # (B=2, 2, L, D)
  weights = jnp.array([[-0.3, -1.5], [0.0, -0.8]], jnp.float32)
  cond = conditioning.PerpNeg(pos=c["cond"], neg=neg, neg_weights=weights, uncond=c["uncond"])
  got = np.asarray(jax.jit(lambda p: conditioning.guided_noise(guidance, p, c["noisy"], c["t"], cond, 7.5))(params))
  eps_u, eps_pos = (np.asarray(x) for x in (c["eps_u"], c["eps_c"]))
  pair = lambda e: np.asarray(c["predict_with"](c["noisy"], c["t"], jnp.stack([e, e]))[1])
  eps_n = [pair(emb[0]), pair(emb[1])]
  e_pos = eps_pos - eps_u
  want_dir = e_pos.copy()
  for i in range(2):
    e = eps_n[i] - eps_u
    for b in range(2):
      x, y = e[b].ravel(), e_pos[b].ravel()
      perp = x - (x @ y) / (y @ y) * y
      assert abs(perp @ y) < 1e-3 * np.linalg.norm(x) * np.linalg.norm(y)  # orthogonal to the positive direction
      want_dir[b] += float(weights[b, i]) * perp.reshape(e_pos[b].shape)
  np.testing.assert_allclose(got, eps_u + 7.5 * want_dir, rtol=1e-3, atol=1e-4)
  # Zero weights: plain classifier-free guidance with the positive prompt.
  cond0 = cond.replace(neg_weights=jnp.zeros_like(weights))
  got0 = np.asarray(jax.jit(lambda p: conditioning.guided_noise(guidance, p, c["noisy"], c["t"], cond0, 7.5))(params))
  np.testing.assert_allclose(got0, eps_u + 7.5 * e_pos, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- VSD (guidance/methods/vsd.py)

def _vsd_inputs(guidance, params, c, *, zero: bool):
  """VSD's trainable tree (zero contribution as initialised, or with random B and last
  camera layer), poses and the LoRA's draws for the sds_case batch."""
  from dreamfusion_jax.guidance.methods import vsd

  trainable = vsd.init_state(params, jax.random.PRNGKey(5), dataclasses.replace(SETTINGS, vsd_lora_rank=2))
  if not zero:
    leaves, treedef = jax.tree_util.tree_flatten(trainable["lora"])
    keys = iter(jax.random.split(jax.random.PRNGKey(6), len(leaves) + 2))
    trainable["lora"] = jax.tree_util.tree_unflatten(
        treedef, [0.05 * jax.random.normal(next(keys), x.shape) for x in leaves])
    cam = trainable["camera"]
    trainable["camera"] = {**cam, "w2": 0.1 * jax.random.normal(next(keys), cam["w2"].shape),
                           "b2": 0.1 * jax.random.normal(next(keys), cam["b2"].shape)}
  c2w = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 4))
  key = jax.random.PRNGKey(8)  # the LoRA loss's draws (vsd.lora_draws)
  lora_t, lora_noise = vsd.lora_draws(key, c["latents"].shape, 1000)
  return dict(trainable=trainable, c2w=c2w, key=key, lora_t=lora_t, lora_noise=lora_noise)


def _vsd_loss(guidance, params, z, c, kw):
  return _latent_loss(_with_method(guidance, method="vsd"), params, z, c, "vsd", state=kw["trainable"], c2w=kw["c2w"],
                      key=kw["key"])


def test_vsd_with_a_zero_initialised_lora_is_cfg_minus_cond(loaded, sds_case):
  """eps_lora starts as the prior's conditional prediction: the gradient is
  w(t) (eps_cfg - eps_cond), exactly what the two plain predictions give."""
  guidance, params = loaded
  c = sds_case
  kw = _vsd_inputs(guidance, params, c, zero=True)
  got = np.asarray(jax.jit(jax.grad(lambda z: _vsd_loss(guidance, params, z, c, kw)[0]))(c["latents"]))
  eps_u, eps_c = np.asarray(c["eps_u"]), np.asarray(c["eps_c"])
  w = np.asarray(1.0 - params["alphas_cumprod"][c["t"]])[:, None, None, None]
  want = w * (eps_u + 7.5 * (eps_c - eps_u) - eps_c) / 2  # batch mean
  # Exact in math; float32 UNet calls on batches of different make-up differ by ~1e-5.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=3e-5)
  assert np.abs(want).max() > 1e-3


def _merged_reference(params, trainable, offset_row):
  """The UNet params with W + A B written out per kernel, and the camera embedding of
  one image folded into the time embedding's last bias (it is added to that layer's
  output): an independent route to eps_lora for that image."""
  unet = traverse_util.flatten_dict(jax.device_get(dict(params["unet"])))
  unet = {k: np.array(v) for k, v in unet.items()}
  for path, ab in traverse_util.flatten_dict(jax.device_get(trainable["lora"])).items():
    if path[-1] == "a":
      kernel = path[:-1] + ("kernel",)
      b = traverse_util.flatten_dict(jax.device_get(trainable["lora"]))[path[:-1] + ("b",)]
      unet[kernel] = unet[kernel] + np.asarray(ab) @ np.asarray(b)
  bias = ("time_embedding", "linear_2", "bias")
  unet[bias] = unet[bias] + offset_row
  return {**params, "unet": traverse_util.unflatten_dict(unet)}


def test_vsd_lora_prediction_matches_merged_weights_and_a_shifted_time_embedding(loaded, sds_case):
  from dreamfusion_jax.guidance.methods import vsd

  guidance, params = loaded
  c = sds_case
  kw = _vsd_inputs(guidance, params, c, zero=False)
  got = np.asarray(jax.jit(lambda p, tr: vsd.lora_noise(guidance, p, tr, c["noisy"], c["t"], _pair(c), kw["c2w"]))(
      params, kw["trainable"]))
  # The camera MLP written out in numpy.
  cam = jax.device_get(kw["trainable"]["camera"])
  x = np.asarray(kw["c2w"]).reshape(2, 12)
  h = x @ cam["w1"] + cam["b1"]
  offset = (h / (1 + np.exp(-h))) @ cam["w2"] + cam["b2"]
  for i in range(2):
    ref_params = _merged_reference(params, kw["trainable"], offset[i])
    want = np.asarray(sd.predict_noise(guidance, ref_params, c["noisy"][i:i + 1], c["t"][i:i + 1],
                                       c["cond"][i:i + 1]))
    np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-4, atol=1e-5)
  # Neither the LoRA nor the camera is a no-op here.
  assert np.abs(got - np.asarray(c["eps_c"])).max() > 1e-3


def test_vsd_gradients_split_between_the_scene_and_the_lora(loaded, sds_case):
  """d/d latents: w (eps_cfg - eps_lora) only (the LoRA's loss sees detached latents);
  d/d LoRA: the LoRA's denoising loss only (the residual is a constant)."""
  from dreamfusion_jax.guidance.methods import vsd

  guidance, params = loaded
  c = sds_case
  kw = _vsd_inputs(guidance, params, c, zero=False)
  g = _with_method(guidance, method="vsd")

  def total(z, tr):
    return _vsd_loss(guidance, params, z, c, {**kw, "trainable": tr})[0]

  grad_z, grad_tr = jax.jit(jax.grad(total, argnums=(0, 1)))(c["latents"], kw["trainable"])
  eps_u, eps_c = np.asarray(c["eps_u"]), np.asarray(c["eps_c"])
  eps_lora = np.asarray(vsd.lora_noise(g, params, kw["trainable"], c["noisy"], c["t"], _pair(c), kw["c2w"]))
  w = np.asarray(1.0 - params["alphas_cumprod"][c["t"]])[:, None, None, None]
  np.testing.assert_allclose(grad_z, w * (eps_u + 7.5 * (eps_c - eps_u) - eps_lora) / 2, rtol=1e-4, atol=3e-5)
  want_tr = jax.grad(lambda tr: vsd.lora_loss(g, params, tr, c["latents"], _pair(c), kw["lora_t"],
                                              kw["lora_noise"], kw["c2w"]))(kw["trainable"])
  for a, b in zip(jax.tree_util.tree_leaves(grad_tr), jax.tree_util.tree_leaves(want_tr)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(grad_tr)) > 1e-4
