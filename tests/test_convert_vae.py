"""The Flax SD-VAE (models/vae.py) and its importer against diffusers' AutoencoderKL.

A small random AutoencoderKL (2 levels, 8 and 16 channels, 4 groups) is saved the way the
published VAE is (save_pretrained: config.json + safetensors; also a torch .bin with the old
attention names) and imported; encode (posterior mean and log-variance) and decode must agree.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill.convert import vae as convert_vae
from hierdistill.models.vae import SD_VAE, AutoencoderKL
from tests.torch_reference import training_files

SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)


def test_sd_vae_param_tree_has_the_published_size():
  model = AutoencoderKL(**{k: v for k, v in SD_VAE.items()})
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  count = sum(a.size for a in jax.tree.leaves(shapes))
  # diffusers' AutoencoderKL at the sd-vae-ft-ema config: 34,163,664 (encoder + quant_conv)
  # + 49,490,199 (post_quant_conv + decoder).
  assert count == 83_653_863
  assert model.downsampling_factor == 8


def test_missing_path_names_the_config_key():
  with pytest.raises(FileNotFoundError, match=r"config\.vae\.path='/nope'.*sd-vae-ft-ema"):
    convert_vae.load_vae("/nope")


def _reference(seed=0):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  ref = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4).eval()
  with torch.no_grad():  # non-trivial norms and biases too
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return torch, ref


def _compare(torch, ref, model, params):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))(
      params, x)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    z = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    dec = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
  np.testing.assert_allclose(mean, dist.mean.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logvar, dist.logvar.permute(0, 2, 3, 1).numpy(), atol=1e-4,
                             rtol=1e-4)
  ours = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(
      params, z)
  want = dec.permute(0, 2, 3, 1).numpy()
  assert float(np.std(want)) > 0.01
  np.testing.assert_allclose(ours, want, atol=1e-4 * float(np.abs(want).max()), rtol=1e-4)


@pytest.mark.torch
def test_import_from_save_pretrained_folder_matches_diffusers(tmp_path):
  torch, ref = _reference()
  ref.save_pretrained(str(tmp_path / "vae"))  # config.json + safetensors, as published
  model, params = convert_vae.load_vae(str(tmp_path / "vae"))
  assert tuple(model.block_out_channels) == (8, 16) and model.norm_num_groups == 4
  _compare(torch, ref, model, params)


@pytest.mark.torch
def test_import_of_a_bin_with_old_attention_names_matches_diffusers(tmp_path):
  torch, ref = _reference(seed=1)
  rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd = {}
  for k, v in ref.state_dict().items():
    for new, old in rename.items():
      if f"attentions.0.{new}." in k:
        k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        if v.ndim == 2:
          v = v[:, :, None, None]  # old files: 1x1 conv kernels
    sd[k] = v
  path = str(tmp_path / "diffusion_pytorch_model.bin")
  torch.save(sd, path)
  model, params = convert_vae.load_vae(path, overrides=SMALL)
  _compare(torch, ref, model, params)


@pytest.mark.torch
def test_import_of_a_training_checkpoint_with_scalars_beside_the_weights(tmp_path):
  torch, ref = _reference(seed=2)
  path = str(tmp_path / "vae.ckpt")  # Lightning's layout: 'state_dict', 0-dim steps, ints
  torch.save(training_files.lightning_style(torch, ref.state_dict()), path)
  model, params = convert_vae.load_vae(path, overrides=SMALL)
  _compare(torch, ref, model, params)


@pytest.mark.torch
def test_wrong_sizes_name_the_key_and_file(tmp_path):
  torch, ref = _reference()
  ref.save_pretrained(str(tmp_path / "vae"))
  with pytest.raises(ValueError, match=r"(unexpected key|has shape).*safetensors"):
    convert_vae.load_vae(str(tmp_path / "vae"), overrides=dict(block_out_channels=(8, 32)))
