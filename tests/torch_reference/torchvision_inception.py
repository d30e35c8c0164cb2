"""pytorch-fid's InceptionV3, built from pytorch-fid's own source on a stand-in for torchvision.

pytorch-fid's FID Inception (the reference of tests/test_convert_inception.py) subclasses
torchvision's Inception blocks, and `pytorch_fid.inception` imports torchvision at its top. The
torchvision wheels on PyPI are built against CUDA builds of PyTorch and do not load beside a CPU
build (their C extension needs libtorch_cuda). So, only when the real torchvision does not
import, a minimal stand-in module `torchvision` is registered that holds what pytorch-fid uses:
`__version__`, `models.inception_v3(num_classes, aux_logits, weights, init_weights)` and
`models.inception.{InceptionA, InceptionC, InceptionE}` base classes. They are written here
from Inception-v3's published architecture (Szegedy et al. 2016; torchvision's module names, as
the published weight file has them), not copied. Everything FID-specific, the patched blocks
(padding-excluding average pools, Mixed_7c's max pool), the block order, the resize and the
input scaling, is pytorch-fid's own code.
"""
import importlib.machinery
import sys
import types

import torch
from torch import nn
import torch.nn.functional as F


class BasicConv2d(nn.Module):
  def __init__(self, in_channels, out_channels, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
  def __init__(self, in_channels, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)


class InceptionB(nn.Module):
  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    a = self.branch3x3(x)
    b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
  def __init__(self, in_channels, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)


class InceptionD(nn.Module):
  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    a = self.branch3x3_2(self.branch3x3_1(x))
    b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
  def __init__(self, in_channels):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)


class Inception3(nn.Module):
  """The stem and the named blocks (pytorch-fid replaces the A, C and E blocks)."""

  def __init__(self, num_classes=1000, aux_logits=False, weights=None, init_weights=False):
    super().__init__()
    assert not aux_logits and weights is None, "the stand-in has no auxiliary head or weights"
    del init_weights
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = InceptionA(192, pool_features=32)
    self.Mixed_5c = InceptionA(256, pool_features=64)
    self.Mixed_5d = InceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, channels_7x7=128)
    self.Mixed_6c = InceptionC(768, channels_7x7=160)
    self.Mixed_6d = InceptionC(768, channels_7x7=160)
    self.Mixed_6e = InceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280)
    self.Mixed_7c = InceptionE(2048)
    self.fc = nn.Linear(2048, num_classes)


def _install_stand_in() -> None:
  tv = types.ModuleType("torchvision")
  tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
  tv.__version__ = "0.28.0"  # pytorch-fid reads it to choose init_weights/weights arguments
  models = types.ModuleType("torchvision.models")
  inception = types.ModuleType("torchvision.models.inception")
  inception.InceptionA, inception.InceptionC, inception.InceptionE = (
      InceptionA, InceptionC, InceptionE)
  models.inception = inception
  models.inception_v3 = lambda *args, **kwargs: Inception3(*args, **kwargs)
  tv.models = models
  sys.modules.update({"torchvision": tv, "torchvision.models": models,
                      "torchvision.models.inception": inception})


def pytorch_fid_inception(state_dict):
  """pytorch_fid.inception.InceptionV3 (pool3 output, resize and scaling on) loaded with
  `state_dict` where pytorch-fid would download the published weights. Returns (model, fc)."""
  saved = {m: mod for m, mod in sys.modules.items()
           if m == "torchvision" or m.startswith("torchvision.") or m == "pytorch_fid.inception"}
  try:
    try:
      import torchvision  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    except Exception:  # pylint: disable=broad-except  (ImportError, or the op-registry error)
      for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
      _install_stand_in()
    import pytorch_fid.inception as fid  # pylint: disable=g-import-not-at-top
    fid.load_state_dict_from_url = lambda *a, **k: state_dict
    model = fid.InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True).eval()
  finally:
    # Leave sys.modules as found: other tests (diffusers) look torchvision up themselves.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")
                 or m == "pytorch_fid.inception"]:
      del sys.modules[name]
    sys.modules.update(saved)
  fc = nn.Linear(2048, 1008)
  fc.load_state_dict({"weight": state_dict["fc.weight"], "bias": state_dict["fc.bias"]})
  return model, fc
