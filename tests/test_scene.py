"""Scene assembly: the untrained field shows its density blob; batch rendering is per image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import dreamfusion
from dreamfusion_jax import cameras, scene as scene_lib, visualize


@pytest.fixture(scope="module")
def tiny():
  config = dreamfusion.get_config("tiny")
  scene = scene_lib.build_scene(config)
  return config, scene, scene.init(jax.random.PRNGKey(0))


def test_untrained_render_png_shows_the_blob(tiny, tmp_path):
  config, _, _ = tiny
  config = config.copy_and_resolve_references()
  config.train.eval_height = config.train.eval_width = 32
  path = visualize.save_untrained_render(config, str(tmp_path / "untrained.png"))
  grid = np.asarray(Image.open(path))
  assert grid.shape == (4 * 32, config.cameras.eval_num_views * 32, 3)
  opacity = grid[64:96, :32, 0].astype(np.float32) / 255  # third row: opacity of view 0
  # The blob (Magic3D's, the default) makes the centre opaque and leaves the corners nearly empty.
  assert opacity[14:18, 14:18].mean() > 0.9
  assert opacity[:3, :3].mean() < 0.1


def test_batch_render_is_per_image(tiny):
  """Rendering 4 views at once equals rendering them one by one with the same keys."""
  config, scene, params = tiny
  cams = cameras.sample_cameras(jax.random.PRNGKey(1), 4)
  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  lights = cameras.sample_lights(jax.random.PRNGKey(3), cams)
  shading = jnp.array([0, 1, 2, 1])
  solid = jax.random.uniform(jax.random.PRNGKey(4), (4, 3))
  use_solid = jnp.array([True, False, True, False])
  render = jax.jit(lambda p, c, k, l, s, bg, u: scene_lib.render_views(
      scene, p, c, height=8, width=8, keys=k, light_positions=l, shading=s, solid_background=bg,
      use_solid_background=u))
  whole = render(params, cams, keys, lights, shading, solid, use_solid)
  for i in range(4):
    one = render(params, jax.tree_util.tree_map(lambda x: x[i:i + 1], cams), keys[i:i + 1], lights[i:i + 1],
                 shading[i:i + 1], solid[i:i + 1], use_solid[i:i + 1])
    for name in ("rgb", "opacity", "orientation"):
      np.testing.assert_allclose(one[name][0], whole[name][i], atol=1e-6, err_msg=name)
  # Views differ: the check above is not comparing constants.
  assert float(jnp.abs(whole["rgb"][0] - whole["rgb"][1]).max()) > 1e-2
