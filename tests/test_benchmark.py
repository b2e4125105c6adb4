"""The benchmark's measuring tools, its tables, the SD-2.1-base shapes and the PyTorch
reference's agreement with our renderer and models on the same weights."""

import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dreamfusion
from dreamfusion_jax import benchmark, cameras, render, scene as scene_lib, state as state_lib, train
from dreamfusion_jax.guidance import conditioning
from dreamfusion_jax.guidance.priors import stable_diffusion as sd
from dreamfusion_jax.guidance import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- measuring


@pytest.mark.parametrize("m,k,n", [(64, 32, 16), (3, 5, 7)])
def test_cost_analysis_counts_a_matmul_as_2mkn(m, k, n):
  f = jax.jit(jnp.dot)
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  assert benchmark.cost_flops(f.lower(a, b).compile()) == 2 * m * k * n
  assert benchmark.cost_flops(f.lower(a, b)) == 2 * m * k * n  # lowered only, nothing compiled


class _FakeAnalysis:
  def __init__(self, analysis):
    self.analysis = analysis

  def cost_analysis(self):
    return self.analysis


@pytest.mark.parametrize("analysis,want", [
    ({"flops": 10.0, "bytes accessed": 3.0}, 10.0),
    ([{"flops": 10.0}, {"flops": 5.0}], 15.0),  # one dict per program (older jax, some backends)
    ([{"bytes accessed": 3.0}], None),
    (None, None),
])
def test_cost_flops_reads_every_shape_of_answer(analysis, want):
  assert benchmark.cost_flops(_FakeAnalysis(analysis)) == want


def test_time_calls_threads_the_state_and_skips_warmup():
  calls = []

  def step(state, increment):
    calls.append(int(state))
    return state + increment, state

  times = benchmark.time_calls(step, (jnp.int32(0), jnp.int32(1)), repeats=3, warmup=2, thread_first=True)
  assert len(times) == 3 and all(t > 0 for t in times)
  assert calls == [0, 1, 2, 3, 4]  # each call saw the previous call's state


def test_measurement_rates():
  m = benchmark.Measurement("x", times_s=(0.3, 0.1, 0.2), flops=4e9)
  assert m.median_s == 0.2 and m.min_s == 0.1
  assert m.flops_per_s == pytest.approx(2e10)
  assert m.mfu(1e11) == pytest.approx(0.2)
  assert m.mfu(None) is None and dataclasses.replace(m, flops=None).mfu(1e11) is None
  assert m.to_json(1e11)["mfu"] == pytest.approx(0.2)


def test_remat_recomputes_the_render_forward():
  config = dreamfusion.get_config("tiny")
  flops = benchmark.render_flops(config)
  scene = scene_lib.build_scene(config)
  settings = train.StepSettings.from_config(config, num_devices=1)
  params = jax.eval_shape(scene.init, jax.random.PRNGKey(0))
  parts = benchmark.StepParts(config=config, guidance=None, guidance_params=None, method=None, embeddings=None,
                              scene=scene,
                              tx=None, settings=settings,
                              state=state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                                                     num_skipped=None),
                              base_key=jax.random.PRNGKey(0))
  fn, args = benchmark.render_fwd_bwd_fn(parts, remat=True)
  remat_flops = benchmark.cost_flops(fn.lower(*args))
  # A lower bound counted by hand: 16x16 rays x 16 samples, each through the MLP's matmuls
  # (8 grid features -> 16 hidden -> 4 outputs: 2 (8 * 16 + 16 * 4) = 384 FLOPs) forward and
  # twice that backward (inputs' and weights' gradients), before the normals' extra passes.
  points = config.train.batch_size * config.render.height * config.render.width * config.render.num_samples
  mlp = 2 * (config.field.num_levels * config.field.features_per_level * config.field.hidden_dim
             + config.field.hidden_dim * 4)
  assert mlp == 384 and flops > 3 * mlp * points
  assert remat_flops > 1.2 * flops


def test_render_flops_grow_with_the_rays_exactly():
  # Every FLOP of the render is spent per ray or per sample, so 4x the rays (32x32 instead of
  # 16x16) or 2x the images cost 4x and 2x the FLOPs: a closed form the count must meet.
  base = benchmark.render_flops(dreamfusion.get_config("tiny"))
  wide = dreamfusion.get_config("tiny")
  wide.render.height = wide.render.width = 32
  double = dreamfusion.get_config("tiny")
  double.train.batch_size *= 2
  assert benchmark.render_flops(wide) == pytest.approx(4 * base, rel=0.01)
  assert benchmark.render_flops(double) == pytest.approx(2 * base, rel=0.01)


# ----------------------------------------------------------------------------- tables


def test_format_table_aligns_columns():
  table = benchmark.format_table(["name", "ms"], [["render", 1.5], ["unet cfg", 12.25], ["text", None]])
  lines = table.split("\n")
  assert lines[0].split() == ["name", "ms"]
  assert set(lines[1].replace(" ", "")) == {"-"}
  assert lines[2] == "render     1.5"
  assert lines[3] == "unet cfg  12.2"
  assert lines[4] == "text       n/a"  # unknown numbers are n/a, right-aligned with the numbers
  assert len({len(line) for line in lines[1:]}) == 1


def test_component_table_reports_mfu_and_ratio():
  results = {"train_step": benchmark.Measurement("train_step", (0.010, 0.012, 0.011), compile_s=2.0, flops=5e8),
             "unet_cfg_fwd": benchmark.Measurement("unet_cfg_fwd", (0.004,), flops=None)}
  table = benchmark.component_table(results, {"float32": 1e11}, reference_s={"train_step": (0.022, 0.020)})
  header, _, step_row, unet_row = table.split("\n")
  assert header.split()[-3:] == ["ms", "jax/torch", "(min)"]
  cells = step_row.split()
  # median 11 ms, 0.5 GFLOP -> 45.5 GFLOP/s -> 45.5 % of 100 GFLOP/s; 11 / 22 ms -> 0.5; min 10 / 20 ms
  assert cells[:4] == ["full", "train", "step", "11"]
  assert "45.5" in cells and cells[-3:] == ["22", "0.5", "0.5"]
  assert unet_row.split()[-3:] == ["n/a"] * 3  # no reference for it


def test_report_prints_every_section():
  m = benchmark.Measurement("train_step", (0.01, 0.02), compile_s=1.0, flops=1e9, temp_bytes=2**20)
  result = {"device": "cpu: cpu x1", "jax_version": jax.__version__, "model": "tiny",
            "settings": {"height": 16, "width": 16, "num_samples": 16, "batch_size": 1, "num_devices": 1,
                         "image_size": 32, "guidance_dtype": "float32", "remat": False, "repeats": 2},
            "peak_flops_per_s": {"float32": 1e11}, "components": {"train_step": m.to_json(1e11)},
            "device_peak_bytes": None, "notes": ["a note"],
            "reference": {"train_step": {"median_s": 0.03, "min_s": 0.03, "times_s": [0.03]}},
            "ratio_jax_over_reference": {"train_step": 0.5},
            "scaling": [{"height": 32, "width": 32, "num_samples": 16, "points": 16384, "median_s": 0.1,
                         "compile_s": 3.0, "flops": 2e9},
                        {"height": 64, "width": 64, "num_samples": 16, "points": 65536, "median_s": 0.3,
                         "compile_s": 3.0, "flops": 8e9}]}
  text = benchmark.report(result)
  assert "train step JAX/PyTorch: 0.50" in text and "(min)" in text
  assert "device peak memory: n/a" in text and "note: a note" in text
  # The scaling table: a header naming its columns, then one row per setting whose "x config"
  # cell is the step time over the first row's (0.3 s / 0.1 s = 3) and GFLOP its FLOPs / 1e9.
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["render", "samples"])
  header = re.split(r"\s{2,}", lines[start].strip())
  assert header == ["render", "samples", "points", "step ms", "x config", "GFLOP", "compile s"]
  assert set(lines[start + 1].replace(" ", "")) == {"-"}
  rows = [line.split() for line in lines[start + 2:start + 4]]
  assert rows[0] == ["32x32", "16", "16384", "100", "1", "2", "3"]
  assert rows[1] == ["64x64", "16", "65536", "300", "3", "8", "3"]


def test_flop_model_table_leaves_the_text_encoder_out_of_an_iteration():
  flops = {"unet_cfg_fwd": 1.5e12, "vae_encode_fwd_bwd": 2.5e12, "text_encoder": 0.2e12}
  text = benchmark.flop_model_table(flops, peak_tflops=1000.0, mfus=(1.0, 0.5))
  assert re.search(r"per iteration \(without the text encoder\) +4\n", text)
  assert "at 1000 TFLOP/s and 100 % MFU: 4.0 ms per iteration" in text
  assert "at 1000 TFLOP/s and 50 % MFU: 8.0 ms per iteration" in text


# ----------------------------------------------------------------------------- SD-2.1-base shapes


@pytest.mark.parametrize("name,make,config,count", [
    # The published parameter counts of stabilityai/stable-diffusion-2-1-base.
    ("unet", sd.unet_from_config, benchmark.SD21_UNET_CONFIG, 865_910_724),
    ("vae", sd.vae_from_config, benchmark.SD21_VAE_CONFIG, 83_653_863),
    ("text_encoder", sd.text_encoder_from_config, benchmark.SD21_TEXT_ENCODER_CONFIG, 340_387_840),
])
def test_sd21_configs_have_the_published_sizes(name, make, config, count):
  _, shapes = make(config)
  assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == count, name


def test_random_params_follow_the_shapes_and_scales():
  shapes = {"dense": {"kernel": jax.ShapeDtypeStruct((400, 8), jnp.float32),
                      "bias": jax.ShapeDtypeStruct((8,), jnp.float32)},
            "norm": {"scale": jax.ShapeDtypeStruct((64,), jnp.float32)}}
  params = benchmark.random_params(shapes, 0, jnp.bfloat16)
  assert params["dense"]["kernel"].shape == (400, 8) and params["dense"]["kernel"].dtype == jnp.bfloat16
  assert float(jnp.std(params["dense"]["kernel"].astype(jnp.float32))) == pytest.approx(1 / 20, rel=0.1)
  assert float(jnp.mean(params["norm"]["scale"].astype(jnp.float32))) == pytest.approx(1.0, abs=0.05)


# ----------------------------------------------------------------------------- the PyTorch reference


@pytest.fixture(scope="module")
def torch_reference():
  pytest.importorskip("torch", exc_type=ImportError)
  sys.path.insert(0, REPO)
  from benchmarks import torch_reference as ref  # pylint: disable=g-import-not-at-top

  return ref


@pytest.fixture(scope="module")
def scene_and_params():
  """The tiny scene with table entries of order 1 (the U(-1e-4, 1e-4) init would make
  the grid invisible) and a hashed level as well as dense ones."""
  config = dreamfusion.get_config("tiny")
  scene = scene_lib.build_scene(config)
  assert scene.field.hash_grid.dense_levels() == (True, True, False, False)
  params = jax.device_get(jax.jit(scene.init)(jax.random.PRNGKey(0)))
  tables = params["field"]["hash_grid"]["tables"]
  params["field"]["hash_grid"]["tables"] = np.random.default_rng(0).uniform(-1, 1, tables.shape).astype(np.float32)
  return config, scene, params


def _rays(height=6, width=5):
  cams = cameras.orbit_cameras(2, elevation_deg=20.0, radius=1.6, fovy_deg=50.0, start_azimuth_deg=30.0)
  origins, directions = cameras.generate_rays(cams, height, width)
  return cams, origins.reshape(-1, 3), directions.reshape(-1, 3)


def test_torch_rays_match(torch_reference):
  import torch  # pylint: disable=g-import-not-at-top

  cams, origins, directions = _rays()
  o, d = torch_reference.generate_rays(torch.tensor(np.asarray(cams.positions)), torch.tensor(np.asarray(cams.c2w)),
                                       torch.tensor(np.asarray(cams.fovy_deg)), 6, 5)
  np.testing.assert_allclose(o.reshape(-1, 3).numpy(), origins, atol=1e-6)
  np.testing.assert_allclose(d.reshape(-1, 3).numpy(), directions, atol=1e-6)


def test_torch_renderer_matches_ours_with_gradients(torch_reference, scene_and_params):
  import torch  # pylint: disable=g-import-not-at-top

  _, scene, params = scene_and_params
  _, origins, directions = _rays()
  n, s = origins.shape[0], 16
  rng = np.random.default_rng(1)
  lights = rng.normal(size=(n, 3)).astype(np.float32) * 2.0
  shading = rng.integers(0, 3, n).astype(np.int32)  # all three modes
  background = rng.uniform(size=(n, 3)).astype(np.float32)
  cotangent = rng.uniform(size=(n, 3)).astype(np.float32)

  def ours(p):
    out = render.render_rays(scene.field_fn(p), origins, directions, key=None, num_samples=s, deterministic=True,
                             light_positions=lights, shading=shading, background=background)
    scalar = jnp.sum(out.rgb * cotangent) + jnp.mean(out.weights.sum(-1)) + \
        jnp.mean(jnp.sum(jax.lax.stop_gradient(out.weights) * jnp.maximum(
            jnp.sum(out.sample_normals * directions[:, None], -1), 0.0) ** 2, -1))
    return scalar, out

  (_, want), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(params)

  field = torch_reference.TorchField(scene.field, params["field"])
  d_t = torch.tensor(np.asarray(directions))
  got = torch_reference.render_rays(field, torch.tensor(np.asarray(origins)), d_t, jitter=torch.full((n, s), 0.5),
                                    bound=1.0, light_positions=torch.tensor(lights),
                                    shading=torch.tensor(shading), background=torch.tensor(background))
  scalar = (got["rgb"] * torch.tensor(cotangent)).sum() + got["weights"].sum(-1).mean() + \
      torch_reference.orientation_loss(got["weights"], got["sample_normals"], d_t)
  scalar.backward()

  assert float(jnp.max(want.opacity)) > 0.5 and float(jnp.min(want.opacity)) < 0.5  # rays hit and miss
  for key, value in (("rgb", want.rgb), ("opacity", want.opacity), ("normals", want.normals)):
    np.testing.assert_allclose(got[key].detach().numpy(), value, atol=2e-5, err_msg=key)
  g = grads["field"]
  np.testing.assert_allclose(field.tables.grad.numpy(), g["hash_grid"]["tables"], atol=1e-4)
  np.testing.assert_allclose(field.kernels[0].grad.numpy(), g["hidden_0"]["kernel"], rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(field.kernels[-1].grad.numpy(), g["output"]["kernel"], rtol=1e-3, atol=1e-4)
  assert float(np.abs(g["hash_grid"]["tables"][3]).max()) > 0  # the hashed level got gradient too


def test_torch_models_load_the_same_tiny_weights(torch_reference, scene_and_params, tmp_path):
  """diffusers' PyTorch from_pretrained reads tiny.py's safetensors: the VAE latents
  (resize included) and the guided noise agree with the Flax models'."""
  import torch  # pylint: disable=g-import-not-at-top

  config, _, params = scene_and_params
  config = config.copy_and_resolve_references()
  config.guidance.model = str(tiny.build_tiny_pipeline_dir(tmp_path / "sd", fmt="safetensors"))
  guidance, gparams = sd.from_config(config.guidance)
  ref = torch_reference.TorchReference(config, config.guidance.model, params, num_threads=1)
  images = np.random.default_rng(2).uniform(size=(1, 16, 16, 3)).astype(np.float32)  # resized to 32
  want = jax.jit(lambda p, x: sd.encode_images(guidance, p, x))(gparams["vae"], images)
  got = ref.encode_images(torch.tensor(images)).detach().permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4 * float(jnp.max(jnp.abs(want))))

  noisy = np.random.default_rng(3).normal(size=(1, 16, 16, 4)).astype(np.float32)
  t = np.array([400], np.int32)
  cond, uncond = ref.cond_emb[:1], ref.uncond_emb[None]
  want = jax.jit(lambda p, z, t, c, u: conditioning.guided_noise(guidance, p, z, t, conditioning.TextPair(c, u),
                                                               guidance.settings.guidance_scale))(
      gparams, noisy, t, cond.numpy(), uncond.numpy())
  got = ref.guided_noise(torch.tensor(noisy).permute(0, 3, 1, 2), torch.tensor(t).long(), cond, uncond)
  # Flax's GEGLU is the tanh GELU, PyTorch's the exact one (docs/guidance.md), amplified by CFG's s = 7.5.
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-3 * float(jnp.max(jnp.abs(want))))
  # Text embeddings from the same tokenizer and weights.
  ours = guidance.encode_prompts(gparams, ["a DSLR photo of a hamburger, front view"])
  np.testing.assert_allclose(ref.cond_emb[:1].numpy(), ours, atol=1e-4 * float(jnp.max(jnp.abs(ours))))

  metrics = ref.train_step()
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and not metrics["skipped"]
  assert not np.allclose(ref.field.tables.detach().numpy(), params["field"]["hash_grid"]["tables"])
