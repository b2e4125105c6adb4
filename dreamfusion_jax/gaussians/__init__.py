"""3D Gaussian splatting in pure JAX: the rasterizer (`rasterize.py`) and the
fixed-capacity pool of Gaussians that DreamGaussian optimises (`pool.py`)."""
