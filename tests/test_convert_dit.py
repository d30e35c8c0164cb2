"""The DiT/SiT importer (hierdistill.convert.dit) against the published architecture.

Without PyTorch: the published layout's parameter count, the DDPM-to-velocity adapter (with an
oracle noise predictor) and the errors. With PyTorch (marker `torch`, the [torch] extra): an
independent PyTorch DiT (tests/torch_reference/dit.py) with random weights is saved with
torch.save, imported through the numpy-only reader, and our network must reproduce it:
  SiT: v(z, t | y) == -SiT(z, 1 - t, y)[:, :C]   (our t = 1 is noise, SiT's t = 0 is)
  DiT: eps(z, s | y) == DiT(z, s, y)[:, :C]       (s the DDPM step)
for t at both ends and inside, and for the null label (row num_classes of the table).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill.convert import dit as convert_dit
from hierdistill.models import DiT, dit_config
from tests.torch_reference import training_files

TINY = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4,
            num_classes=10, out_channels=8)
TORCH_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                  num_heads=4, num_classes=10, learn_sigma=True)


def test_published_layout_has_the_published_param_count():
  layout = convert_dit.published_layout(depth=28, hidden_size=1152, patch_size=2, in_channels=4,
                                        out_channels=8, num_classes=1000, input_size=32)
  # DiT-XL/2's published count (DiT's README), pos_embed included.
  assert convert_dit.param_count(layout) == 675_129_632
  assert layout["y_embedder.embedding_table.weight"] == (1001, 1152)


def test_ddpm_velocity_with_an_oracle_noise_predictor_is_e_minus_x():
  # At t matched to integer DDPM steps k, an oracle eps_fn that knows x returns the true noise;
  # the adapter must then give exactly our velocity e - x.
  abar = convert_dit.ddpm_alphas_cumprod()
  k = np.array([0, 10, 250, 500, 998, 999])
  nsr = np.sqrt((1 - abar[k]) / abar[k])
  t = nsr / (1 + nsr)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 4, 4, 2))
  e = rng.standard_normal((6, 4, 4, 2))
  z = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * e

  def oracle(x_s, s, y):
    del y
    a = abar[np.rint(np.asarray(s)).astype(int)][:, None, None, None]
    np.testing.assert_allclose(np.asarray(s), k, atol=2e-3)  # t -> s hits the integer steps
    return (x_s - np.sqrt(a) * x) / np.sqrt(1 - a)

  v = convert_dit.ddpm_velocity(oracle, jnp.asarray(z, jnp.float32), t, None, abar)
  np.testing.assert_allclose(np.asarray(v), e - x, atol=2e-3, rtol=1e-3)


def test_model_fields_and_null_row_errors_name_the_key():
  model = DiT(**TINY)  # time_scale 1000: a DiT-style embedder, wrong for a SiT file
  with pytest.raises(ValueError, match=r"config\.model\.time_scale=1000.0.*SIT"):
    convert_dit.check_model_fields(model, "sit")
  model = DiT(time_scale=1.0, time_flip=True, **TINY)
  layout = convert_dit.published_layout(depth=2, hidden_size=32, patch_size=2, in_channels=4,
                                        out_channels=8, num_classes=10, input_size=8,
                                        null_row=False)
  sd = {k: np.zeros(s, np.float32) for k, s in layout.items()}
  with pytest.raises(ValueError, match="no null-label row.*in ckpt.pt.*SiT repository"):
    convert_dit.import_dit(sd, model, kind="sit", path="ckpt.pt")
  layout = convert_dit.published_layout(depth=2, hidden_size=32, patch_size=2, in_channels=4,
                                        out_channels=8, num_classes=10, input_size=8)
  sd = {k: np.zeros(s, np.float32) for k, s in layout.items()}
  del sd["blocks.1.mlp.fc2.bias"]
  with pytest.raises(ValueError, match="missing key 'blocks.1.mlp.fc2.bias' .*in ckpt.pt"):
    convert_dit.import_dit(sd, model, kind="sit", path="ckpt.pt")
  with pytest.raises(FileNotFoundError, match=r"config\.teacher\.checkpoint='/nonexistent.pt'.*"
                     "SiT-XL-2-256x256.pt"):
    convert_dit.load_dit_checkpoint("/nonexistent.pt", model, kind="sit",
                                    config_key="config.teacher.checkpoint")


# ---------------------------------------------------------------------------------------------
# Against the PyTorch reference.


def _reference(seed=0, **kw):
  torch = pytest.importorskip("torch")
  from tests.torch_reference.dit import DiT as TorchDiT
  torch.manual_seed(seed)
  ref = TorchDiT(**{**TORCH_TINY, **kw}).eval()
  # Random "trained" weights everywhere (DiT's zero inits would make the output trivially 0).
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name != "pos_embed":
        p.copy_(0.2 * torch.randn_like(p))
  return torch, ref


def _inputs(batch=5, seed=1):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
  t = np.array([0.0, 0.3, 0.5, 0.97, 1.0], np.float32)[:batch]
  y = np.array([0, 3, 10, 9, 10], np.int32)[:batch]  # 10 = the null label
  return z, t, y


@pytest.mark.torch
def test_reference_state_dict_layout_is_the_published_one():
  torch = pytest.importorskip("torch")
  from tests.torch_reference.dit import DiT as TorchDiT
  with torch.device("meta"):  # XL/2 without allocating its 2.7 GB
    ref = TorchDiT(**dit_config("DiT-XL/2"), input_size=32, in_channels=4, num_classes=1000)
  got = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  want = convert_dit.published_layout(depth=28, hidden_size=1152, patch_size=2, in_channels=4,
                                      out_channels=8, num_classes=1000, input_size=32)
  assert got == want


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True])
def test_sit_import_matches_reference_velocity(tmp_path, legacy):
  torch, ref = _reference()
  path = str(tmp_path / "sit.pt")
  # A training checkpoint of SiT's train.py: the importer must take 'ema'.
  torch.save(training_files.dit_style(torch, ref.state_dict()), path,
             _use_new_zipfile_serialization=not legacy)
  model = DiT(**TINY, **convert_dit.MODEL_FIELDS["sit"])
  params = convert_dit.load_dit_checkpoint(path, model, kind="sit")
  z, t, y = _inputs()
  ours = jax.jit(lambda p, z, t, y: model.apply({"params": p}, z, None, t, y))(params, z, t, y)
  with torch.no_grad():
    sit = ref(torch.from_numpy(z).permute(0, 3, 1, 2), torch.from_numpy(1.0 - t),
              torch.from_numpy(y).long()).numpy()
  want = -sit[:, :4].transpose(0, 2, 3, 1)
  assert float(np.std(want)) > 0.1
  np.testing.assert_allclose(np.asarray(ours), want, atol=2e-5 * float(np.abs(want).max()),
                             rtol=1e-4)


@pytest.mark.torch
def test_dit_import_matches_reference_noise_prediction(tmp_path):
  torch, ref = _reference(seed=3)
  path = str(tmp_path / "dit.pt")
  torch.save(ref.state_dict(), path)
  model = DiT(**TINY, **convert_dit.MODEL_FIELDS["dit"])
  params = convert_dit.load_dit_checkpoint(path, model, kind="dit")
  z, t, y = _inputs()
  # The network itself, read raw (the adapter off): DiT's noise prediction at DDPM steps s.
  raw = model.clone(prediction="velocity", time_scale=1.0)
  s = np.array([0.0, 17.5, 400.0, 998.0, 999.0], np.float32)  # DDPM steps, fractional allowed
  ours = jax.jit(lambda p, z, s, y: raw.apply({"params": p}, z, None, s, y))(params, z, s, y)
  eps_ref = lambda x, s: ref(torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2),
                             torch.from_numpy(np.asarray(s, np.float32)),
                             torch.from_numpy(y).long())[:, :4].permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    want = eps_ref(z, s)
  np.testing.assert_allclose(np.asarray(ours), want, atol=2e-5 * float(np.abs(want).max()),
                             rtol=1e-4)
  # The teacher's call (prediction='ddpm_noise') is the DDPM adapter around it: our velocity
  # v = (eps(x_s, s(t)) - z) / (1 - t), x_s = z / sqrt((1 - t)^2 + t^2), t at both ends.
  v = jax.jit(lambda p, z, t, y: model.apply({"params": p}, z, None, t, y))(params, z, t, y)
  s_t, scale, t_c = (np.asarray(a, np.float64) for a in convert_dit.ddpm_time_of(t))
  with torch.no_grad():
    eps = eps_ref(z * scale[:, None, None, None], s_t)
  want = (eps - z) / (1 - t_c)[:, None, None, None]
  np.testing.assert_allclose(np.asarray(v), want, atol=1e-4 * float(np.abs(want).max()),
                             rtol=1e-3)


@pytest.mark.torch
def test_imported_sit_keeps_the_sigma_half_and_negates_only_the_prediction(tmp_path):
  torch, ref = _reference(seed=5)
  model = DiT(**TINY, **convert_dit.MODEL_FIELDS["sit"])
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params = convert_dit.import_dit(sd, model, kind="sit")
  bias = params["final_layer"]["linear"]["bias"].reshape(2, 2, 8)
  want = sd["final_layer.linear.bias"].reshape(2, 2, 8)
  np.testing.assert_array_equal(bias[..., :4], -want[..., :4])
  np.testing.assert_array_equal(bias[..., 4:], want[..., 4:])
  # Every param of the model is filled, with its shape.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), None,
                          jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)):
    assert a.shape == b.shape
  assert math.isclose(sum(a.size for a in jax.tree.leaves(params)) + 16 * 32,
                      sum(v.size for v in sd.values()))
