"""The Flax FID Inception (evaluation/inception.py) and its importer.

Without PyTorch: the resizers against TensorFlow's (tf.compat.v1 bilinear, the one in the FID
graph) and closed forms; the random-weights helper. With PyTorch (marker `torch`): pytorch-fid's
InceptionV3 (its own code on a torchvision stand-in, tests/torch_reference) with random weights
in the published key layout; the Flax net must give the same pool3 features from the same
images through the 'pytorch_fid' preprocessing.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill.convert import inception as convert_inception
from hierdistill.evaluation import inception


def test_tf_resize_matches_tensorflow_v1_bilinear():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (2, 13, 11, 3)).astype(np.float32)
  want = tf.compat.v1.image.resize_bilinear(x, (29, 29), align_corners=False,
                                            half_pixel_centers=False).numpy()
  # Non-square input: each axis gets its own matrix.
  got = np.asarray(inception.resize_bilinear(jnp.asarray(x), 29, half_pixel=False))
  np.testing.assert_allclose(got, want, atol=1e-3)
  want_hp = tf.image.resize(x, (29, 29), method="bilinear", antialias=False).numpy()
  got_hp = np.asarray(inception.resize_bilinear(jnp.asarray(x), 29, half_pixel=True))
  np.testing.assert_allclose(got_hp, want_hp, atol=1e-3)


def test_bilinear_matrix_rows_sum_to_one_and_identity_at_same_size():
  for half in (False, True):
    m = inception.bilinear_matrix(256, 299, half)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(inception.bilinear_matrix(7, 7, half), np.eye(7), atol=1e-7)


def test_preprocess_ranges():
  x = jnp.full((1, 8, 8, 3), 255.0)
  assert float(inception.preprocess(x, "tf", size=8).max()) == pytest.approx(127 / 128)
  assert float(inception.preprocess(x, "pytorch_fid", size=8).max()) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="preprocessing mode"):
    inception.preprocess(x, "jpeg")


def test_small_width_random_net_runs_and_published_layout_is_complete():
  model = inception.FIDInceptionV3(width=0.125)
  params = inception.random_params(model)
  out = jax.jit(inception.make_feature_fn(model, "tf", size=75))(
      params, jnp.zeros((2, 32, 32, 3)) + 100.0)
  assert out["pool"].shape == (2, 256) and out["logits"].shape == (2, 1008)
  layout = convert_inception.published_layout()
  assert layout["fc.weight"] == (1008, 2048)
  assert layout["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert layout["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  with pytest.raises(FileNotFoundError, match=r"config\.eval\.inception_weights=''.*pytorch-fid"):
    convert_inception.load_inception("")


def _random_published_state_dict(torch, seed=0):
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for key, shape in convert_inception.published_layout().items():
    if key.endswith("running_var"):
      sd[key] = torch.rand(shape, generator=g) + 0.5
    elif key.endswith((".bn.weight",)):
      sd[key] = torch.rand(shape, generator=g) + 0.5
    elif key.endswith(("running_mean", ".bias")):
      sd[key] = 0.1 * torch.randn(shape, generator=g)
    else:
      fan_in = int(np.prod(shape[1:]))
      sd[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
  return sd


@pytest.mark.torch
def test_import_matches_pytorch_fid_features(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("pytorch_fid")
  from tests.torch_reference.torchvision_inception import pytorch_fid_inception
  sd = _random_published_state_dict(torch)
  ref, fc = pytorch_fid_inception(sd)  # strict load: the layout is pytorch-fid's
  path = str(tmp_path / "pt_inception.pth")
  torch.save(sd, path)
  params = convert_inception.load_inception(path)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images / 255.0).float().permute(0, 3, 1, 2)
    want = ref(x)[0].flatten(1)
    want_logits = (want @ fc.weight.T).numpy()
    want = want.numpy()
  fn = jax.jit(inception.make_feature_fn(inception.FIDInceptionV3(), "pytorch_fid"))
  out = fn(params, jnp.asarray(images))
  assert float(np.std(want)) > 0.01
  np.testing.assert_allclose(out["pool"], want, atol=1e-4 * float(np.abs(want).max()), rtol=1e-3)
  np.testing.assert_allclose(out["logits_unbiased"], want_logits,
                             atol=1e-4 * float(np.abs(want_logits).max()), rtol=1e-3)
