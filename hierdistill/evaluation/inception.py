"""Inception-v3 of the FID papers ("pt_inception-2015-12-05"), in Flax: pool3 features and logits.

This is the network of TensorFlow's 2015 Inception graph that FID, IS and ADM's evaluator use,
in the module layout of pytorch-fid's port (torchvision's Inception3 plus FID's patches), so that
convert/inception.py maps pytorch-fid's weight file one to one. It is *not* torchvision's
ImageNet Inception: the weights differ and so do three blocks (PITFALLS.md: numbers made with
other Inception weights are not FID):
  - the average pools of Mixed_5b-d, Mixed_6b-e and Mixed_7b exclude the zero padding from the
    mean (TensorFlow's SAME average pooling; count_include_pad=False);
  - Mixed_7c pools its pool branch with a max pool, not an average pool;
  - the classifier has 1008 outputs.
Every conv is conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU.

Input: images (B, H, W, 3) with values in [0, 255] (uint8 or float). Preprocessing (`mode`):
  'tf'           what ADM's evaluator and TF FID do: TensorFlow 1's bilinear resize to 299
                 (align_corners=False without half-pixel centres) on [0, 255], then
                 (x - 128) / 128: the graph's own ResizeBilinear, Sub and Mul nodes.
  'pytorch_fid'  pytorch-fid's: x / 255, PyTorch's bilinear resize (half-pixel centres), 2x - 1.
Outputs: dict(pool=(B, 2048) the pool3 features of FID and precision/recall,
logits_unbiased=pool @ W, the logits the Inception Score code uses (it multiplies by the softmax
weights without the bias), logits=pool @ W + b).

`width` scales every channel count: only for tests and CPU smoke runs with random weights (the
published weights need width=1).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
INPUT_SIZE = 299
NUM_CLASSES = 1008
MODES = ("tf", "pytorch_fid")


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm with fixed statistics -> ReLU. Params: conv/kernel,
  bn/{scale, bias, mean, var} (all in 'params': the net is never trained here)."""
  features: int
  kernel: Tuple[int, int] = (1, 1)
  stride: int = 1
  padding: Tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype, name="conv")(x)
    bn = _FrozenBatchNorm(self.features, name="bn")
    return nn.relu(bn(x))


class _FrozenBatchNorm(nn.Module):
  features: int
  epsilon: float = 1e-3  # torchvision's BasicConv2d (TensorFlow's Inception used 1e-3)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    inv = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype)


def _avg_pool_same(x: Array) -> Array:
  # TensorFlow's SAME average pool: padded zeros are not counted in the mean.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool(x: Array, stride: int, pad: int = 0) -> Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
  """Helper base: self.c(n) scales a channel count by the width."""
  width: float = 1.0
  dtype: Any = jnp.float32

  def c(self, n: int) -> int:
    return max(1, int(round(n * self.width)))

  def conv(self, name, n, kernel=(1, 1), stride=1, padding=(0, 0)) -> BasicConv:
    return BasicConv(self.c(n), kernel, stride, padding, self.dtype, name=name)


class InceptionA(_Block):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(self.conv("branch5x5_1", 48)(x))
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, (3, 3), stride=2)(x)
    bd = self.conv("branch3x3dbl_1", 64)(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(_Block):
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_2", c7, **row)(b7)
    b7 = self.conv("branch7x7_3", 192, **col)(b7)
    bd = self.conv("branch7x7dbl_1", c7)(x)
    bd = self.conv("branch7x7dbl_2", c7, **col)(bd)
    bd = self.conv("branch7x7dbl_3", c7, **row)(bd)
    bd = self.conv("branch7x7dbl_4", c7, **col)(bd)
    bd = self.conv("branch7x7dbl_5", 192, **row)(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, (3, 3), stride=2)(self.conv("branch3x3_1", 192)(x))
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(_Block):
  max_pool_branch: bool = False  # FID's Mixed_7c

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, **row)(b3),
                          self.conv("branch3x3_2b", 384, **col)(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448)(x)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, **row)(bd),
                          self.conv("branch3x3dbl_3b", 384, **col)(bd)], axis=-1)
    pooled = _max_pool(x, 1, 1) if self.max_pool_branch else _avg_pool_same(x)
    bp = self.conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception on preprocessed inputs (B, 299, 299, 3) in [-1, 1] (see `preprocess`)."""
  width: float = 1.0
  num_classes: int = NUM_CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Dict[str, Array]:
    w, dt = self.width, self.dtype
    c = lambda n: max(1, int(round(n * w)))
    x = BasicConv(c(32), (3, 3), 2, dtype=dt, name="Conv2d_1a_3x3")(x)
    x = BasicConv(c(32), (3, 3), dtype=dt, name="Conv2d_2a_3x3")(x)
    x = BasicConv(c(64), (3, 3), padding=(1, 1), dtype=dt, name="Conv2d_2b_3x3")(x)
    x = _max_pool(x, 2)
    x = BasicConv(c(80), dtype=dt, name="Conv2d_3b_1x1")(x)
    x = BasicConv(c(192), (3, 3), dtype=dt, name="Conv2d_4a_3x3")(x)
    x = _max_pool(x, 2)
    x = InceptionA(w, dt, pool_features=32, name="Mixed_5b")(x)
    x = InceptionA(w, dt, pool_features=64, name="Mixed_5c")(x)
    x = InceptionA(w, dt, pool_features=64, name="Mixed_5d")(x)
    x = InceptionB(w, dt, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(w, dt, channels_7x7=c7, name=name)(x)
    x = InceptionD(w, dt, name="Mixed_7a")(x)
    x = InceptionE(w, dt, name="Mixed_7b")(x)
    x = InceptionE(w, dt, max_pool_branch=True, name="Mixed_7c")(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    unbiased, logits = _Classifier(self.num_classes, name="fc")(pool)
    return {"pool": pool, "logits_unbiased": unbiased, "logits": logits}


class _Classifier(nn.Module):
  """The 1008-way softmax layer: (pool @ W, pool @ W + b)."""
  num_classes: int

  @nn.compact
  def __call__(self, pool: Array) -> Tuple[Array, Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (pool.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    unbiased = jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)
    return unbiased, unbiased + bias


# ---------------------------------------------------------------------------------------------
# Preprocessing.


@functools.lru_cache(maxsize=16)
def bilinear_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
  """(out, in) float32 matrix of 1-D bilinear resampling.

  half_pixel=False: TensorFlow 1's resize_bilinear(align_corners=False): source = dst * in/out.
  half_pixel=True: PyTorch's interpolate(mode='bilinear', align_corners=False): source =
  (dst + 0.5) * in/out - 0.5, clamped at 0. Either way the upper neighbour is clamped to the
  last pixel.
  """
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = (dst + 0.5) * scale - 0.5 if half_pixel else dst * scale
  src = np.maximum(src, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(x: Array, size: int, half_pixel: bool) -> Array:
  """(B, H, W, C) -> (B, size, size, C) by separable bilinear matrices (exact, no antialias:
  what both reference resizers do)."""
  rows = jnp.asarray(bilinear_matrix(x.shape[1], size, half_pixel))
  cols = jnp.asarray(bilinear_matrix(x.shape[2], size, half_pixel))
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=hi)


def preprocess(images: Array, mode: str = "tf", size: int = INPUT_SIZE) -> Array:
  """Images (B, H, W, 3) in [0, 255] -> the network's input (B, size, size, 3) in [-1, 1]."""
  x = jnp.asarray(images, jnp.float32)
  if mode == "tf":
    if x.shape[1:3] != (size, size):
      x = resize_bilinear(x, size, half_pixel=False)
    return (x - 128.0) / 128.0
  if mode == "pytorch_fid":
    x = x / 255.0
    if x.shape[1:3] != (size, size):
      x = resize_bilinear(x, size, half_pixel=True)
    return 2.0 * x - 1.0
  raise ValueError(f"unknown Inception preprocessing mode {mode!r}; choose from {MODES}")


def make_feature_fn(model: FIDInceptionV3, mode: str = "tf", size: int = INPUT_SIZE
                    ) -> Callable[[Any, Array], Dict[str, Array]]:
  """(params, images in [0, 255]) -> outputs dict; jit it (with shardings) at the call site."""
  def fn(params, images):
    return model.apply({"params": params}, preprocess(images, mode, size))
  return fn


def random_params(model: FIDInceptionV3, seed: int = 0, size: int = 75) -> Any:
  """Random weights for tests and runlocal only: He-normal kernels and identity BatchNorm
  statistics, so activations keep their scale through the ~50 ReLU layers and the features
  still tell images apart. Features of a random net are not FID: never report them as FID."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("var", "scale"):
      return jnp.ones(leaf.shape, jnp.float32)
    if name in ("mean", "bias"):
      return jnp.zeros(leaf.shape, jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes["params"])
