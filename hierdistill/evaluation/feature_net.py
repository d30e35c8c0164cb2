"""Small classifiers: the feature nets of the embedded image metrics (FD-digits, FD-fashion, ...).

Inception-v3 is meaningless on 8x8 digits and 28x28 grey clothes, so the metrics of the embedded
image sets live in the feature space of a conv net of their own (CLASSIFIERS), trained once on
the set's train split, its accuracy measured on the test split, and cached beside the data:
  <data_dir>/<name>_classifier/params.msgpack  (flax.serialization of the variables)
  <data_dir>/<name>_classifier/info.json       (test accuracy, training config, data set, shape)
The cache is keyed by the data set's name and example shape and the training config: change any
and the net is retrained. Numbers made with it must be named for it ("FD-digits", "FD-fashion",
never FID), and compared only with numbers made with the same cached net, the same sample count
and the same reference set.

Training is deterministic: fixed init seed, a fixed order of minibatches (np.random.default_rng
permutations), fixed augmentation draws (fold_in of a fixed key with the step). Augmentation
(+-1 pixel shifts, small Gaussian noise) makes the net tolerant of the slightly shifted, noisy
digits a one-step generator produces, so its features do not overreact to them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import time
from typing import Callable

import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

CACHE_SUBDIR = "digits8x8_classifier"
# Part of the cache key: change any value and the cached net is retrained. The digits' nets pool
# once, after the second conv (no 'pool_after' key: the cache predates it; see ConvClassifier).
TRAIN_CONFIG = dict(
    version=1,
    seed=0,
    steps=500,
    batch_size=128,
    learning_rate=2e-3,
    weight_decay=1e-4,
    max_shift=1,  # pixels
    noise_std=0.1,  # in the [-1, 1] image scale
    widths=[16, 32, 32],  # A list, as JSON gives it back: the cache compares configs.
    feature_dim=128,
)

# Fashion-MNIST's 28x28 clothes: two 2x2 pools (28 -> 14 -> 7), more channels, more steps.
# [ours] Measured on a 2-core CPU: test accuracy and training time are in the cache's info.json
# (README: the Fashion-MNIST miniature).
FASHION_TRAIN_CONFIG = dict(
    TRAIN_CONFIG,
    steps=1200,
    widths=[32, 64, 64],
    pool_after=[0, 1],  # 2x2 average pool after these convs
)


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
  """The feature net of one embedded image set.

  metric_suffix names the metrics made with it: FD-<suffix>, IS-<suffix>. The class count is
  the config's num_classes (10 when absent).
  """
  shape: tuple[int, ...]
  train_config: dict
  metric_suffix: str


# Data set name -> its feature net. The digits' cache directory is CACHE_SUBDIR.
CLASSIFIERS = {
    "digits8x8": ClassifierSpec((8, 8, 1), TRAIN_CONFIG, "digits"),
    "fashion_mnist": ClassifierSpec((28, 28, 1), FASHION_TRAIN_CONFIG, "fashion"),
}

ApplyFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


class ConvClassifier(nn.Module):
  """Conv net on (B, H, W, C) images in [-1, 1] -> (features (B, feature_dim), logits (B, K)).

  3x3 convs of `widths` channels, each followed by ReLU and, for the convs in pool_after, a 2x2
  average pool; then a dense layer of feature_dim and the logits.
  features: the penultimate layer (after ReLU), used for FD / precision / recall.
  """
  widths: tuple[int, ...] = (16, 32, 32)
  pool_after: tuple[int, ...] = (1,)  # the digits' net: 8x8 -> 4x4 after the second conv
  feature_dim: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      if i in self.pool_after:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(self.num_classes)(features)


def _architecture(config: dict) -> dict:
  """ConvClassifier's fields from a training config (hashable, for the compile cache)."""
  return dict(widths=tuple(config["widths"]), pool_after=tuple(config.get("pool_after", (1,))),
              feature_dim=config["feature_dim"], num_classes=config.get("num_classes", 10))


def _augment(key, x, max_shift: int, noise_std: float):
  """Random integer shifts in [-max_shift, max_shift] (background fill) plus Gaussian noise."""
  b, h, w, _ = x.shape
  k_shift, k_noise = jax.random.split(key)
  shifts = jax.random.randint(k_shift, (b, 2), 0, 2 * max_shift + 1)
  padded = jnp.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
  crop = jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1], 0), (h, w, im.shape[-1])))
  x = crop(padded, shifts)
  return x + noise_std * jax.random.normal(k_noise, x.shape)


@functools.lru_cache(maxsize=4)
def _compiled_fns(widths: tuple[int, ...], pool_after: tuple[int, ...], feature_dim: int,
                  num_classes: int, weight_decay: float, max_shift: int, noise_std: float):
  """Jitted (init, optimiser init, train step), cached so that repeated trainings compile once.

  The learning rate is an argument of the step, not part of the optimiser, so that neither the
  schedule nor the number of steps changes the compiled program.
  """
  model = ConvClassifier(widths=widths, pool_after=pool_after, feature_dim=feature_dim,
                         num_classes=num_classes)
  # adamw with its learning rate factored out: updates = -lr * (adam + wd * params).
  tx = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))

  def loss_fn(params, x, y):
    _, logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  # A Python loop over one jitted step, not a lax.scan: XLA:CPU ran these convolutions about
  # 20x slower inside a while loop (measured: 1.4 s against 60 ms a step).
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, x, y, key, i, lr):
    x = _augment(jax.random.fold_in(key, i), x, max_shift, noise_std)
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state

  return jax.jit(model.init), jax.jit(tx.init), step


def train_classifier(images: np.ndarray, labels: np.ndarray, config: dict) -> dict:
  """Trains a ConvClassifier deterministically; returns its variables ({'params': ...}).

  images: float32 (N, H, W, C) in [-1, 1]; labels: int (N,); config: e.g. TRAIN_CONFIG.
  """
  c = dict(config)
  a = _architecture(c)
  init, opt_init, step = _compiled_fns(a["widths"], a["pool_after"], a["feature_dim"],
                                       a["num_classes"], c["weight_decay"], c["max_shift"],
                                       c["noise_std"])
  # 'rbg' keys: the same determinism as threefry, but XLA:CPU compiles the initialisers about
  # 4x faster (8 s -> 2 s for this net on a busy 2-core machine).
  key_init, key_aug = jax.random.split(jax.random.key(c["seed"], impl="rbg"))
  params = init(key_init, jnp.zeros((1,) + images.shape[1:]))["params"]
  opt_state = opt_init(params)

  # The whole minibatch order, fixed up front: epoch e is default_rng([seed, e]).permutation.
  n, bs = len(images), c["batch_size"]
  if n < bs:
    raise ValueError(f"need at least batch_size={bs} training images, got {n}")
  per_epoch = n // bs  # Drop the ragged tail of each epoch: one static batch shape.
  epochs = max(1, -(-c["steps"] // per_epoch))
  order = np.concatenate([
      np.random.default_rng([c["seed"], e]).permutation(n)[:per_epoch * bs] for e in range(epochs)
  ]).reshape(-1, bs)[:c["steps"]]
  # Cosine decay to 0, as optax.cosine_decay_schedule(learning_rate, steps).
  lrs = c["learning_rate"] * 0.5 * (1.0 + np.cos(np.pi * np.arange(c["steps"]) / c["steps"]))

  images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
  for i, idx in enumerate(order):
    params, opt_state = step(params, opt_state, images[idx], labels[idx],
                             key_aug, np.int32(i), np.float32(lrs[i]))
  return {"params": jax.device_get(params)}


def train_digits_classifier(images: np.ndarray, labels: np.ndarray,
                            config: dict | None = None) -> dict:
  """train_classifier on (N, 8, 8, 1) digits; config: TRAIN_CONFIG by default."""
  return train_classifier(images, labels, TRAIN_CONFIG if config is None else config)


def make_apply_fn(variables: dict, config: dict | None = None) -> ApplyFn:
  """A jitted images (B, H, W, C) in [-1, 1] -> (features (B, D), logits (B, K)).

  config: the training config the variables were made with (TRAIN_CONFIG by default).
  """
  model = ConvClassifier(**_architecture(TRAIN_CONFIG if config is None else config))
  variables = jax.device_put(variables)
  return jax.jit(lambda x: model.apply(variables, jnp.asarray(x, jnp.float32)))


def compute_features(apply_fn: ApplyFn, images, batch_size: int = 1000):
  """Runs apply_fn over many images in fixed-size batches (one compile; the tail is padded).

  Returns numpy (features (N, D), logits (N, C)).
  """
  images = np.asarray(images, np.float32)
  feats, logits = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    f, l = apply_fn(np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]))
    feats.append(np.asarray(f)[:len(chunk)])
    logits.append(np.asarray(l)[:len(chunk)])
  return np.concatenate(feats), np.concatenate(logits)


@contextlib.contextmanager
def _lock(directory: str):
  """Serialises training among processes that share data_dir: one trains, the others load."""
  with open(os.path.join(directory, ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _read_cache(cache_dir: str, config: dict, name: str, shape: tuple):
  try:
    with open(os.path.join(cache_dir, "info.json")) as f:
      info = json.load(f)
    # Caches written before the key held the data set and shape are the digits' own (the
    # directory names the set); compare what is there.
    if (info.get("train_config") != config or info.get("dataset", name) != name
        or tuple(info.get("shape", shape)) != tuple(shape)):
      return None
    with open(os.path.join(cache_dir, "params.msgpack"), "rb") as f:
      variables = serialization.msgpack_restore(f.read())
  except FileNotFoundError:
    return None
  return variables, info


def _write_atomic(path: str, data: bytes) -> None:
  # Write-then-rename: a reader never sees half a file, even if this process dies midway.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def cache_dir_of(name: str, data_dir: str) -> str:
  """Where the feature net of data set `name` is cached under data_dir."""
  return os.path.join(os.fspath(data_dir), f"{name}_classifier")


def load_or_train_classifier(name: str, data_dir: str, verbose: bool = True,
                             train_config: dict | None = None):
  """The cached feature net of data set `name` under data_dir, trained (and cached) first.

  The data set is built in data_dir too if absent (data.load_dataset).
  Args:
    name: a key of CLASSIFIERS ('digits8x8', 'fashion_mnist').
    train_config: overrides CLASSIFIERS[name].train_config (tests train a tiny net on a mock).
  Returns:
    apply_fn: images (B, *shape) in [-1, 1] -> (features (B, feature_dim), logits (B, K)), jitted.
    info: dict with test_accuracy, train_seconds, train_config, dataset, shape,
      loaded_from_cache, ...
  """
  if name not in CLASSIFIERS:
    raise ValueError(f"no feature net for data set {name!r}; choose from {sorted(CLASSIFIERS)}")
  spec = CLASSIFIERS[name]
  cache_dir = cache_dir_of(name, data_dir)
  # As the cache stores it (JSON), for comparison.
  config = json.loads(json.dumps(spec.train_config if train_config is None else train_config))
  cached = _read_cache(cache_dir, config, name, spec.shape)
  trained = False
  if cached is None:
    from hierdistill import data  # pylint: disable=g-import-not-at-top

    # Builds the data, or says clearly that data_dir is not writable or the files are absent.
    train = data.load_dataset(name, "train", data_dir=data_dir)
    try:
      os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
      raise PermissionError(f"cannot create {cache_dir!r} ({e.strerror}) to cache the {name} "
                            "classifier; pass a writable data_dir.") from None
    with _lock(cache_dir):
      cached = _read_cache(cache_dir, config, name, spec.shape)  # Another process may have
      if cached is None:                                         # trained it meanwhile.
        test = data.load_dataset(name, "test", data_dir=data_dir)
        t0 = time.perf_counter()
        variables = train_classifier(train.x, train.y, config)
        seconds = time.perf_counter() - t0
        _, logits = compute_features(make_apply_fn(variables, config), test.x)
        info = dict(
            test_accuracy=float(np.mean(np.argmax(logits, -1) == test.y)),
            num_test=len(test.y),
            num_train=len(train.y),
            train_seconds=round(seconds, 2),
            train_config=config,
            dataset=name,
            shape=list(spec.shape),
            platform=jax.default_backend(),
            jax_version=jax.__version__,
        )
        _write_atomic(os.path.join(cache_dir, "params.msgpack"),
                      serialization.msgpack_serialize(variables))
        _write_atomic(os.path.join(cache_dir, "info.json"),
                      json.dumps(info, indent=2).encode())
        if verbose:
          print(f"{name} classifier: test accuracy {info['test_accuracy']:.4f} "
                f"({len(test.y)} images), trained in {seconds:.1f} s, cached in {cache_dir}")
        cached, trained = (variables, info), True
  variables, info = cached
  return make_apply_fn(variables, config), dict(info, loaded_from_cache=not trained)


def load_or_train_digits_classifier(data_dir: str, verbose: bool = True):
  """load_or_train_classifier('digits8x8', data_dir): the digits' feature net (8x8 -> 128)."""
  return load_or_train_classifier("digits8x8", data_dir, verbose=verbose)
