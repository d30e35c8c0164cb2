"""VA-VAE (LDM's KL autoencoder with attention at resolution 16) in models/vae.py, imported by
convert/vavae.py, against tests/torch_reference/ldm_autoencoder.py (a restatement of
LightningDiT's tokenizer/autoencoder.py) with random weights; and LightningDiT's latent
statistics file."""
import jax
import numpy as np
import pytest

from hierdistill.convert import vavae as convert_vavae
from hierdistill.models.vae import VA_VAE_F16D32, AutoencoderKL
from tests.torch_reference import training_files

# A small LDM autoencoder: channels (32, 32, 64) (GroupNorm(32) needs multiples of 32), 16x16
# images -> 4x4x4 latents, attention after every resnet of the 4x4 level (level 2).
SMALL_TORCH = dict(embed_dim=4, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), resolution=16)
SMALL = dict(latent_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
             norm_num_groups=32, scaling_factor=1.0, attention_levels=(2,))


@pytest.mark.torch
def test_va_vae_f16d32_layout_and_param_count():
  torch = pytest.importorskip("torch")
  from tests.torch_reference.ldm_autoencoder import AutoencoderKL as TorchAE
  with torch.device("meta"):
    ref = TorchAE()  # the published f16d32 sizes
  n_ref = sum(v.numel() for v in ref.state_dict().values())
  model = AutoencoderKL(**VA_VAE_F16D32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)))
  n_ours = sum(a.size for a in jax.tree.leaves(shapes))
  assert n_ours == n_ref == 69_836_067
  assert model.downsampling_factor == 16


@pytest.mark.torch
def test_import_matches_ldm_reference(tmp_path):
  torch = pytest.importorskip("torch")
  from tests.torch_reference.ldm_autoencoder import AutoencoderKL as TorchAE
  torch.manual_seed(0)
  ref = TorchAE(**SMALL_TORCH).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.copy_(float(name.endswith("norm.weight") or ".norm" in name) + 0.1 * torch.randn_like(p))
  sd = dict(ref.state_dict())
  # A training checkpoint: the loss (LDM's contperceptual loss holds a 0-dim logvar), the
  # foundation model and its projection are dropped; Lightning's scalars sit beside them.
  sd.update({"loss.logvar": torch.ones(()), "foundation_model.model.w": torch.zeros(3),
             "linear_proj.weight": torch.zeros(768, 4, 1, 1)})
  path = str(tmp_path / "vavae.pt")
  torch.save(training_files.lightning_style(torch, sd), path)
  from hierdistill.convert.torch_files import load_state_dict
  model = AutoencoderKL(**SMALL)
  params = convert_vavae.import_vavae(load_state_dict(path), model, path=path)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
      params, x)
  with torch.no_grad():
    ref_mean, ref_logvar = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2))
  for got, want in ((mean, ref_mean), (logvar, ref_logvar)):
    want = want.numpy().transpose(0, 2, 3, 1)
    assert float(np.std(want)) > 0.05
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * float(np.abs(want).max()),
                               rtol=1e-4)
  z = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
  out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, z)
  with torch.no_grad():
    want = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-4 * float(np.abs(want).max()),
                             rtol=1e-4)
  # A key the LDM layout does not have is one line naming it and the published file.
  sd["encoder.down.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)
  with pytest.raises(ValueError, match=r"unexpected key 'encoder\.down\.0\.attn\.0\.q\.weight'"
                     r".*hustvl/vavae-imagenet256-f16d32-dinov2"):
    convert_vavae.import_vavae({k: v.numpy() for k, v in sd.items()}, model, path="x.pt")


@pytest.mark.torch
def test_latent_stats_file(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "latents_stats.pt")
  mean, std = torch.randn(1, 32, 1, 1), torch.rand(1, 32, 1, 1) + 0.5
  torch.save({"mean": mean, "std": std}, path)
  m, s = convert_vavae.load_latent_stats(path)
  np.testing.assert_array_equal(m, mean.numpy().reshape(-1))
  np.testing.assert_array_equal(s, std.numpy().reshape(-1))
  torch.save({"mean": mean[:, :4]}, path)
  with pytest.raises(ValueError, match="'mean' has 4 values, the VAE has 32"):
    convert_vavae.load_latent_stats(path)
  with pytest.raises(FileNotFoundError, match=r"config\.vae\.stats_path='/no'.*latents_stats"):
    convert_vavae.load_latent_stats("/no")


def test_ldm_keys_map_to_the_diffusers_names():
  assert (convert_vavae.diffusers_key("decoder.up.4.attn.2.proj_out.weight", 5)
          == "decoder.up_blocks.0.attentions.2.to_out.0.weight")
  assert (convert_vavae.diffusers_key("encoder.down.1.block.0.nin_shortcut.bias", 5)
          == "encoder.down_blocks.1.resnets.0.conv_shortcut.bias")
  assert (convert_vavae.diffusers_key("encoder.mid.attn_1.norm.weight", 5)
          == "encoder.mid_block.attentions.0.group_norm.weight")
  assert (convert_vavae.diffusers_key("decoder.up.0.upsample.conv.weight", 5)
          == "decoder.up_blocks.4.upsamplers.0.conv.weight")


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True])
def test_zero_dim_tensors_and_train_args_load(tmp_path, legacy):
  torch = pytest.importorskip("torch")
  from hierdistill.convert.torch_files import load_state_dict, load_torch_file
  path = str(tmp_path / "ckpt.pt")
  weights = {"w": torch.arange(6.0).reshape(2, 3), "loss.logvar": torch.ones(()),
             "view": torch.arange(4.0)[2], "count": torch.tensor(5)}  # the view has an offset
  torch.save(training_files.dit_style(torch, weights, steps=7), path,
             _use_new_zipfile_serialization=not legacy)
  got = load_state_dict(path)
  assert {k: (type(v), v.shape, v.dtype) for k, v in got.items()} == {
      "w": (np.ndarray, (2, 3), np.float32), "loss.logvar": (np.ndarray, (), np.float32),
      "view": (np.ndarray, (), np.float32), "count": (np.ndarray, (), np.int64)}
  assert (float(got["loss.logvar"]), float(got["view"]), int(got["count"])) == (1.0, 2.0, 5)
  whole = load_torch_file(path)
  assert whole["args"].model == "SiT-XL/2" and whole["steps"] == 7  # argparse.Namespace read
  assert whole["opt"]["state"][0]["step"].shape == ()
