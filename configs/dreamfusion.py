"""DreamFusion with Stable Diffusion 2.1 base: every knob of a text-to-3D run.

Usage:
  python scripts/train.py --config=configs/dreamfusion.py --config.prompt="a hamburger"
  python scripts/train.py --config=configs/dreamfusion.py:small ...   # a named variant

Named variants (the part after ':'):
  small   fewer steps and a smaller field: a quick look at a prompt.
  tiny    a few steps at toy sizes on a tiny random model directory (tests, CI); needs
          --config.guidance.model=DIR pointing at such a directory.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.prompt = "a DSLR photo of a hamburger"
  c.seed = 0
  # The scene representation: "nerf" (config.field, render.py) or "gaussians" (3D
  # Gaussians, config.gaussians: see configs/dreamgaussian.py and docs/gaussians.md).
  c.representation = "nerf"
  # Image-to-3D (configs/zero123.py): the input image (RGBA, or RGB on a plain
  # background; see reference.object_size) and the view it was taken from. "" = text-to-3D.
  # With an image, config.prompt only names the run (and the toy object it is scored
  # against); the guidance model must be a Zero-1-to-3 checkpoint.
  c.image = ""
  ref = c.reference = ml_collections.ConfigDict()
  ref.elevation_deg = 0.0
  ref.azimuth_deg = 0.0
  ref.radius = 1.8
  ref.fovy_deg = 40.0
  # 0: the image as it is (square, framed as this camera sees the object); f in (0, 1]:
  # recentred first, the object's longer side f of the frame (reference_image.recenter).
  ref.object_size = 0.0
  ref.rgb_weight = 1000.0  # the input view's colour loss (losses.reference_view_loss)
  ref.mask_weight = 1000.0  # ... and its mask loss

  # The 2D prior (dreamfusion_jax.guidance).
  g = c.guidance = ml_collections.ConfigDict()
  g.prior = "stable_diffusion"  # the prior's module in dreamfusion_jax/guidance/priors/
  g.model = "stabilityai/stable-diffusion-2-1-base"  # hub id (from the local cache) or directory
  g.dtype = "float32"  # or "bfloat16" for the frozen weights and activations
  g.negative_prompt = ""
  g.view_dependent = True  # append ", front view" etc. by camera azimuth/elevation
  g.guidance_scale = 100.0
  g.weight = 1.0  # the SDS loss's weight in the total (threestudio's lambda_sds); 0: no prior at all
  g.t_min = 0.02  # fraction of the diffusion's training timesteps
  g.t_max = 0.98
  g.t_max_end = 0.98  # t_max anneals linearly to this over t_anneal_steps (0: off)
  g.t_anneal_steps = 0
  g.weighting = "sds"  # w(t): see dreamfusion_jax.guidance.sds
  g.grad_clip = 0.0  # clip |w(t)(eps_hat - eps)| elementwise; 0 disables
  g.image_size = 512  # rendered images are resized to this before the VAE
  # Encode renders to a sample of the VAE posterior (threestudio, stable-dreamfusion)
  # instead of its mean (False). The SD VAE's posterior std is small, so the two differ
  # little; the mean keeps a step deterministic given t and the noise. No effect on a
  # pixel-space prior (the toy prior has no VAE).
  g.sample_posterior = False
  # The SDS family (dreamfusion_jax/guidance): "sds", "csd" (classifier score only),
  # "ism" (LucidDreamer's interval score: DDIM-inverted x_s, s = t - ism_delta_t),
  # "vsd" (ProlificDreamer: a camera-conditioned LoRA of the prior, trained alongside the
  # scene, replaces the noise; use a guidance_scale of ~7.5 with it, as the paper does).
  g.method = "sds"
  g.ism_delta_t = 50  # training timesteps between x_s and x_t (LucidDreamer: 50)
  g.ism_inv_steps = 5  # DDIM inversion steps from the clean latents to x_s (LucidDreamer: 5)
  g.vsd_lora_rank = 4  # rank of VSD's LoRA on the UNet's attention projections
  g.vsd_lr = 1e-4  # Adam learning rate of VSD's LoRA and camera embedding (threestudio's)
  # Perp-Neg: the other views' prompts as negatives, perpendicular to the positive
  # direction (guidance/perp_neg.py; threestudio's weights). Works with every method.
  g.perp_neg = False

  # Rendering of training views.
  r = c.render = ml_collections.ConfigDict()
  r.height = 64
  r.width = 64
  r.num_samples = 64
  r.num_importance_samples = 0
  r.bound = 1.0  # radius of the bounding sphere
  r.normal_mode = "analytic"  # or "finite_difference"
  r.ambient = 0.1
  r.diffuse = 0.9
  r.shading_probs = (0.1, 0.45, 0.45)  # albedo, lambertian, textureless (DreamFusion)
  r.albedo_warmup_steps = 0  # albedo-only shading for the first steps
  r.eval_chunk = 4096  # rays per chunk when rendering evaluation views

  cam = c.cameras = ml_collections.ConfigDict()
  cam.radius_range = (1.0, 1.5)
  # DreamFusion (appendix A) and threestudio sample elevations in [-10, 90]; above
  # overhead_threshold_deg the prompt says "overhead view". 90 is allowed: look_at takes
  # the limit of the frame there (cameras.look_at's fallback_up).
  cam.elevation_range_deg = (-10.0, 90.0)
  cam.azimuth_range_deg = (-180.0, 180.0)
  cam.fovy_range_deg = (40.0, 70.0)
  cam.camera_perturb = 0.1
  cam.center_perturb = 0.2
  cam.up_perturb = 0.02
  cam.stratified_azimuth = True
  cam.light_distance_range = (0.8, 1.5)
  cam.light_perturb = 1.0
  cam.overhead_threshold_deg = 60.0
  cam.front_threshold_deg = 45.0
  cam.back_threshold_deg = 45.0
  # Fixed views for validation renders and videos.
  cam.eval_num_views = 4
  cam.eval_elevation_deg = 15.0
  cam.eval_radius = 1.25
  cam.eval_fovy_deg = 55.0

  f = c.field = ml_collections.ConfigDict()
  f.encoding = "hashgrid"  # or "positional"
  f.num_levels = 16
  f.features_per_level = 2
  f.log2_table_size = 19
  f.base_resolution = 16
  f.max_resolution = 2048
  f.num_frequencies = 6  # positional encoding only
  f.hidden_dim = 64
  f.num_layers = 2
  # Density blob added before the activation (fields.BLOB_SOURCES), named after its source:
  #   "dreamfusion": 5 exp(-|x|^2 / (2 0.2^2)) with exp density (DreamFusion, stable-dreamfusion);
  #   "magic3d":     10 (1 - |x| / 0.5) with softplus density (Magic3D, threestudio);
  #   "none".
  # Default: Magic3D's, at its own strength, radius and activation, as threestudio's
  # dreamfusion-sd config does ("the density initialization proposed in the DreamFusion
  # paper does not work very well"): the bias is negative outside the radius, so empty
  # space starts clear, while DreamFusion's Gaussian with exp leaves density ~1 (a fog)
  # everywhere. Picking another kind means setting its strength, radius and activation too.
  f.blob_kind = "magic3d"
  f.blob_strength = 10.0
  f.blob_radius = 0.5
  f.density_activation = "softplus"  # or "exp"
  # Coarse-to-fine hash grid (threestudio's ProgressiveBandHashGrid): levels
  # [0, start_levels + max(step - start_step, 0) // update_every) are on. start_levels
  # >= num_levels: all levels from the start (the default). threestudio's dreamfusion-sd:
  # start_levels 8, start_step 2000, update_every 500.
  f.progressive_start_levels = 16
  f.progressive_start_step = 0
  f.progressive_update_every = 500

  bg = c.background = ml_collections.ConfigDict()
  bg.kind = "mlp"  # "mlp" (learned from ray direction), "fixed" or "random"
  bg.color = (1.0, 1.0, 1.0)
  bg.num_frequencies = 4
  bg.hidden_dim = 32
  bg.random_prob = 0.5  # with kind "mlp": chance of a random solid colour per image

  # Regularizer weights; each ramps linearly from 0 over its warmup steps (0: constant).
  lo = c.loss = ml_collections.ConfigDict()
  lo.orientation_weight = 1e-2
  lo.orientation_warmup_steps = 0
  lo.opacity_weight = 0.0
  lo.opacity_warmup_steps = 0
  lo.entropy_weight = 0.0
  lo.entropy_warmup_steps = 0

  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-2
  o.background_lr = 1e-3
  o.b1 = 0.9
  o.b2 = 0.99
  o.eps = 1e-15
  o.grad_clip = 0.0  # global-norm clipping; 0 disables
  o.schedule = "constant"  # or "cosine"
  o.warmup_steps = 0

  t = c.train = ml_collections.ConfigDict()
  t.steps = 10000
  t.batch_size = 1  # per device: the global batch is devices x batch_size
  t.log_every = 50
  t.eval_every = 1000
  t.ckpt_every = 1000
  t.keep_checkpoints = 3
  t.eval_height = 128
  t.eval_width = 128
  t.render_video = False  # turntable video at the end of training
  t.export_mesh = False  # marching-cubes mesh (GLB, +Y up, UV texture) at the end of training
  t.mesh_resolution = 128  # density grid points per axis for that mesh
  t.mesh_target_faces = 0  # decimate that mesh to at most this many faces; 0 keeps every face

  # Multi-host: one process per host, all running the same command (docs/scale_out.md).
  c.distributed = False  # join a multi-process job first (dreamfusion_jax.distributed)
  cl = c.cluster = ml_collections.ConfigDict()
  cl.coordinator_address = ""  # "host:port" of process 0; "" = JAX_COORDINATOR_ADDRESS or auto-detect
  cl.num_processes = 0  # 0 = auto-detect
  cl.process_id = -1  # -1 = auto-detect
  cl.initialization_timeout_s = 300  # how long to wait for every process to join
  cl.heartbeat_timeout_s = 100  # JAX's: a peer silent this long is dead and the job aborts
  cl.peer_timeout_s = 30  # ours: a peer silent this long ends every process with one line
  # How long processes wait for each other at exit: process 0 may still be writing the
  # end-of-run video and mesh while the others are done.
  cl.shutdown_timeout_s = 3600
  cl.stop_check_every = 10  # steps between the processes' agreement on a stop request (SIGTERM)

  if variant == "small":
    t.steps = 2000
    f.log2_table_size = 16
    f.max_resolution = 512
    t.eval_every = t.ckpt_every = 500
  elif variant == "tiny":
    g.image_size = 32
    g.guidance_scale = 7.5
    r.height = r.width = 16
    r.num_samples = 16
    f.num_levels = 4
    f.log2_table_size = 10
    f.base_resolution = 4
    f.max_resolution = 32
    f.hidden_dim = 16
    f.num_layers = 1
    bg.hidden_dim = 8
    cam.eval_num_views = 2
    t.steps = 6
    t.log_every = 2
    t.eval_every = t.ckpt_every = 3
    t.eval_height = t.eval_width = 16
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/dreamfusion.py; known: small, tiny")
  return c
