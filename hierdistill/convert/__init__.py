"""Importers of published PyTorch checkpoints into hierdistill's Flax modules.

  torch_files.py   .safetensors / .pt / .pth / .bin -> {key: numpy array}; no PyTorch needed
                   for .safetensors and torch.save's zip format (a restricted unpickler)
  dit.py           official DiT and SiT checkpoints -> models.DiT params (time and velocity
                   conventions translated; DiT's DDPM noise prediction -> our velocity)
  vae.py           SD-VAE in diffusers layout -> models.vae.AutoencoderKL params
  inception.py     pytorch-fid's FID Inception-v3 weights -> evaluation.inception params

Each importer checks every key and shape, and names the key, the file and where such a file is
published when something does not match. Tests: tests/test_convert_*.py (marker `torch`).
"""
