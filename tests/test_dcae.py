"""The Flax DC-AE (models/dcae.py) and its importer (convert/dcae.py) against diffusers'
AutoencoderDC.

A tiny random AutoencoderDC (3 stages of 8, 16, 32 channels; a ResBlock stage and two EfficientViT
stages with 3x3 and 5x5 multi-scale branches; latent 4 channels) is saved as the published one is
(save_pretrained: config.json + safetensors) and imported; encode and decode must agree to float32
precision. With head_dim 16, the 4 x 4 stage takes diffusers' quadratic attention branch and the
8 x 8 stage its linear one. Both down/up-sampling kinds are checked.
"""
import math

import jax
import numpy as np
import pytest

from hierdistill.convert import dcae as convert_dcae
from hierdistill.models.dcae import (DCAE_F32C32, AutoencoderDC, pixel_shuffle,
                                     pixel_unshuffle)

TINY = dict(in_channels=3, latent_channels=4, attention_head_dim=16,
            encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
            encoder_layers_per_block=(1, 1, 2), decoder_layers_per_block=(1, 2, 1),
            encoder_qkv_multiscales=((), (3,), (5,)), decoder_qkv_multiscales=((), (3,), (5,)),
            scaling_factor=0.41407)


def test_f32c32_param_count_and_factor():
  model = AutoencoderDC()  # the published sana-1.0 / 1.1 configuration
  shapes = convert_dcae.param_shapes(model)
  count = sum(math.prod(s) for s in shapes.values())
  encoder = sum(math.prod(s) for k, s in shapes.items() if k[0] == "encoder")
  # diffusers' AutoencoderDC at that config holds the same numbers (test below): 1.25 GB in fp32.
  assert (count, encoder) == (312_250_275, 153_027_104)
  assert model.downsampling_factor == 32 and model.scaling_factor == 0.41407


def test_pixel_shuffle_layout_is_torchs():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  y = np.asarray(pixel_unshuffle(x))
  assert y.shape == (2, 2, 3, 12)
  # channel c * 4 + 2 i + j holds pixel (2 h + i, 2 w + j) of channel c.
  assert y[1, 1, 2, 2 * 4 + 2 * 1 + 0] == x[1, 3, 4, 2]
  np.testing.assert_array_equal(pixel_shuffle(y), x)


def test_missing_path_and_unsupported_config_are_one_line():
  with pytest.raises(FileNotFoundError, match=r"config\.vae\.path='/nope'.*dc-ae-f32c32-sana"):
    convert_dcae.load_dcae("/nope")
  with pytest.raises(ValueError, match=r"decoder_norm_types=.*only 'rms_norm'"):
    convert_dcae.param_shapes(AutoencoderDC(decoder_norm_types=("batch_norm",) * 6))


def _reference(seed=0, **changes):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  ref = diffusers.AutoencoderDC(**{**TINY, **changes}).eval()
  with torch.no_grad():  # non-trivial norms too
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return torch, ref


def _compare(torch, ref, model, params):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  ours_z, ours_x = jax.jit(lambda p: (
      model.apply({"params": p}, x, method=AutoencoderDC.encode),
      model.apply({"params": p}, z, method=AutoencoderDC.decode)))(params)
  with torch.no_grad():
    want_z = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent.permute(0, 2, 3, 1)
    want_x = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
  for ours, want in ((ours_z, want_z.numpy()), (ours_x, want_x.numpy())):
    assert ours.shape == want.shape and float(np.std(want)) > 0.1
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.torch
@pytest.mark.parametrize("down, up, variant", [("Conv", "interpolate", None),
                                               ("pixel_unshuffle", "pixel_shuffle", "fp16")])
def test_import_from_save_pretrained_folder_matches_diffusers(tmp_path, down, up, variant):
  torch, ref = _reference(downsample_block_type=down, upsample_block_type=up)
  # config.json + safetensors, as published (variant: diffusion_pytorch_model.fp16.safetensors)
  ref.save_pretrained(str(tmp_path / "vae"), variant=variant)
  # A pipeline folder: its vae/ is read.
  model, params = convert_dcae.load_dcae(str(tmp_path), variant=variant)
  assert model.encoder_block_out_channels == (8, 16, 32) and model.upsample_block_type == up
  _compare(torch, ref, model, params)


@pytest.mark.torch
def test_wrong_sizes_name_the_key_and_file(tmp_path):
  torch, ref = _reference()
  ref.save_pretrained(str(tmp_path / "vae"))
  with pytest.raises(ValueError, match=r"^encoder\.conv_in\.\w+ in .*safetensors has shape "
                     r"\(8[,)].*, the model expects \(16[,)]"):
    convert_dcae.load_dcae(str(tmp_path / "vae"),
                           overrides=dict(encoder_block_out_channels=(16, 16, 32)))
  with pytest.raises(ValueError,
                     match=r"unexpected key 'encoder\.down_blocks\.2\.1\..*safetensors"):
    convert_dcae.load_dcae(str(tmp_path / "vae"),
                           overrides=dict(encoder_layers_per_block=(1, 1, 1)))
  with pytest.raises(ValueError, match=r"safetensors lacks the weights of encoder/down_blocks_2_2"):
    convert_dcae.load_dcae(str(tmp_path / "vae"),
                           overrides=dict(encoder_layers_per_block=(1, 1, 3)))


@pytest.mark.torch
def test_f32c32_param_count_matches_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):  # shapes only
    ref = diffusers.AutoencoderDC(**DCAE_F32C32)
  assert sum(p.numel() for p in ref.parameters()) == 312_250_275
  assert sum(p.numel() for p in ref.encoder.parameters()) == 153_027_104
