"""dreamfusion-jax: text-to-3D by Score Distillation Sampling in JAX/Flax."""

import setuptools

setuptools.setup(
    name="dreamfusion-jax",
    version="0.1.0",
    description="Text-to-3D (DreamFusion / Score Distillation Sampling) in JAX and Flax.",
    packages=setuptools.find_packages(include=["dreamfusion_jax", "dreamfusion_jax.*"]),
    package_data={"dreamfusion_jax": ["assets/*", "assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8.5",
        "optax>=0.2.2",
        "orbax-checkpoint>=0.5.20",
        "ml-collections>=0.1.1",
        "absl-py>=1.0",
        "numpy>=1.24",
        "pillow>=9.0",
        "safetensors>=0.4",
        # Flax model classes were removed from diffusers 0.40 and transformers 5.
        "diffusers>=0.35,<0.40",
        "transformers>=4.45,<5",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "trimesh>=4.0",
        "PyMCubes>=0.1.4",
        "scipy>=1.9",  # trimesh splits meshes into connected components with it
        "imageio>=2.30",
        "imageio-ffmpeg>=0.4.9",
        "xatlas>=0.0.11",  # UV atlases for textured mesh export
        "fast-simplification>=0.2",  # mesh decimation (trimesh's simplify_quadric_decimation)
    ],
    extras_require={
        # JAX's accelerator builds (docs/scale_out.md): NVIDIA GPUs with CUDA 12, Cloud TPU.
        "cuda12": ["jax[cuda12]>=0.4.30"],
        "tpu": ["jax[tpu]>=0.4.30"],
        # CPU torch for the PyTorch-parity tests and the benchmark reference; 2.13.0 is
        # the CPU build on our machines' disk (any other version pulls a CUDA build).
        "torch": ["torch==2.13.0"],
        "test": ["pytest>=7.0", "pytest-xdist>=3.8", "torch==2.13.0", "ruff>=0.5"],
        "benchmark": ["torch==2.13.0"],
    },
)
