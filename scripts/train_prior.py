"""Trains an embedded toy prior (resumable) and exports it into the package.

  python scripts/train_prior.py --workdir=runs/prior --steps=3000
  # the view-conditioned (Zero-1-to-3) prior for image-to-3D:
  # its UNet starts from the shipped text prior's, as Zero-1-to-3's starts from Stable Diffusion's
  python scripts/train_prior.py --kind=zero123 --workdir=runs/prior_zero123 --steps=...
  # on a machine without that workdir, continue from the committed weights:
  python scripts/train_prior.py --workdir=runs/prior --steps=3000 \
      --warm_start=dreamfusion_jax/assets/toy_prior

Renders the training set with the project's renderer on the first run, checkpoints
every --ckpt_every steps (rerun to resume) and writes the EMA weights to
dreamfusion_jax/assets/toy_prior/ (toy_zero123/) every --export_every steps, with a PNG grid of DDIM
samples in the workdir.
"""

import sys

from absl import app, flags, logging

from dreamfusion_jax import cli

_KIND = flags.DEFINE_enum("kind", "text", ["text", "zero123"], "Which prior: text-to-image (toy_prior.py) or "
                          "view-conditioned image-to-image (toy_zero123.py).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/prior", "Checkpoints, data set and sample grids.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Total training steps (the shipped weights: 3000).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per step.")
_PER_OBJECT = flags.DEFINE_integer("per_object", 256, "Rendered views of each of the 16 objects.")
_LR = flags.DEFINE_float("lr", 5e-4, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data set, initialisation and batches.")
_CKPT = flags.DEFINE_integer("ckpt_every", 250, "Steps between checkpoints.")
_EXPORT = flags.DEFINE_integer("export_every", 500, "Steps between exports of the EMA weights.")
_OUT = flags.DEFINE_string("out", None, "Export directory (default: the package's assets/toy_prior or "
                           "assets/toy_zero123).")
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "Export the latest checkpoint's EMA weights and exit.")
_UNET_FROM = flags.DEFINE_string("unet_from", None, "--kind=zero123, new workdir: the text prior whose UNet "
                                 "starts the view-conditioned one (Zero-1-to-3's recipe; default the shipped text "
                                 "prior, dreamfusion_jax/assets/toy_prior); '' for a random start.")
_WARM = flags.DEFINE_string("warm_start", None, "Prior directory to start from when the workdir has no "
                            "checkpoint (e.g. dreamfusion_jax/assets/toy_prior to continue the shipped weights).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cli.apply_cpu_xla_flags()  # what training runs with (docs/performance.md); before JAX starts
  from dreamfusion_jax import errors, toy_prior, toy_zero123

  module = toy_zero123 if _KIND.value == "zero123" else toy_prior
  unet_from = toy_prior.PRIOR_DIR if _UNET_FROM.value is None else (_UNET_FROM.value or None)
  extra = {"unet_from": unet_from} if _KIND.value == "zero123" else {}
  try:
    module.train_prior(_WORKDIR.value, steps=_STEPS.value, batch_size=_BATCH.value, per_object=_PER_OBJECT.value,
                       lr=_LR.value, seed=_SEED.value, ckpt_every=_CKPT.value, export_every=_EXPORT.value,
                       out_dir=_OUT.value or module.PRIOR_DIR, warm_start=_WARM.value,
                       export_only=_EXPORT_ONLY.value, **extra)
  except errors.InputError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
