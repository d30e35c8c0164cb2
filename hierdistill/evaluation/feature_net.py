"""A small digits classifier: the feature net of the digits metrics (FD-digits, IS-digits, ...).

Inception-v3 is meaningless on 8x8 digits, so the metrics of the embedded experiment live in the
feature space of this net, trained once on the digits train split and cached beside the data:
  <data_dir>/digits8x8_classifier/params.msgpack  (flax.serialization of the variables)
  <data_dir>/digits8x8_classifier/info.json       (test accuracy, training config, versions)
Numbers made with it must be named for it ("FD-digits", never FID), and compared only with numbers
made with the same cached net, the same sample count and the same reference split.

Training is deterministic: fixed init seed, a fixed order of minibatches (np.random.default_rng
permutations), fixed augmentation draws (fold_in of a fixed key with the step). Augmentation
(+-1 pixel shifts, small Gaussian noise) makes the net tolerant of the slightly shifted, noisy
digits a one-step generator produces, so its features do not overreact to them.
"""
from __future__ import annotations

import contextlib
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
# Part of the cache key: change any value and the cached net is retrained.
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

ApplyFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


class DigitsClassifier(nn.Module):
  """Conv net on (B, 8, 8, 1) images in [-1, 1] -> (features (B, feature_dim), logits (B, 10)).

  features: the penultimate layer (after ReLU), used for FD / precision / recall.
  """
  widths: tuple[int, int, int] = (16, 32, 32)
  feature_dim: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.widths[0], (3, 3))(x))
    x = nn.relu(nn.Conv(self.widths[1], (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 8x8 -> 4x4
    x = nn.relu(nn.Conv(self.widths[2], (3, 3))(x))
    features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(self.num_classes)(features)


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
def _compiled_fns(widths: tuple[int, ...], feature_dim: int, weight_decay: float,
                  max_shift: int, noise_std: float):
  """Jitted (init, optimiser init, train step), cached so that repeated trainings compile once.

  The learning rate is an argument of the step, not part of the optimiser, so that neither the
  schedule nor the number of steps changes the compiled program.
  """
  model = DigitsClassifier(widths=widths, feature_dim=feature_dim)
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


def train_digits_classifier(images: np.ndarray, labels: np.ndarray,
                            config: dict | None = None) -> dict:
  """Trains DigitsClassifier deterministically; returns its variables ({'params': ...}).

  images: float32 (N, 8, 8, 1) in [-1, 1]; labels: int (N,). config: TRAIN_CONFIG by default.
  """
  c = dict(TRAIN_CONFIG if config is None else config)
  init, opt_init, step = _compiled_fns(tuple(c["widths"]), c["feature_dim"], c["weight_decay"],
                                       c["max_shift"], c["noise_std"])
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


def _model(config: dict) -> DigitsClassifier:
  return DigitsClassifier(widths=tuple(config["widths"]), feature_dim=config["feature_dim"])


def make_apply_fn(variables: dict, config: dict | None = None) -> ApplyFn:
  """A jitted images (B, 8, 8, 1) in [-1, 1] -> (features (B, D), logits (B, 10)).

  config: the training config the variables were made with (TRAIN_CONFIG by default).
  """
  model = _model(TRAIN_CONFIG if config is None else config)
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


def _read_cache(cache_dir: str, config: dict):
  try:
    with open(os.path.join(cache_dir, "info.json")) as f:
      info = json.load(f)
    if info.get("train_config") != config:
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


def load_or_train_digits_classifier(data_dir: str, verbose: bool = True):
  """The cached digits classifier under data_dir, trained (and cached) first if absent.

  The digits data set is built in data_dir too if absent (data.digits).
  Returns:
    apply_fn: images (B, 8, 8, 1) in [-1, 1] -> (features (B, 128), logits (B, 10)), jitted.
    info: dict with test_accuracy, train_seconds, train_config, loaded_from_cache, ...
  """
  cache_dir = os.path.join(os.fspath(data_dir), CACHE_SUBDIR)
  config = json.loads(json.dumps(TRAIN_CONFIG))  # As the cache stores it, for comparison.
  cached = _read_cache(cache_dir, config)
  trained = False
  if cached is None:
    from hierdistill.data import digits  # pylint: disable=g-import-not-at-top

    digits.builder(data_dir)  # Builds the data, or says clearly that data_dir is not writable.
    try:
      os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
      raise PermissionError(f"cannot create {cache_dir!r} ({e.strerror}) to cache the digits "
                            "classifier; pass a writable data_dir.") from None
    with _lock(cache_dir):
      cached = _read_cache(cache_dir, config)  # Another process may have trained it meanwhile.
      if cached is None:
        x_train, y_train = digits.load_digits_split("train", data_dir)
        x_test, y_test = digits.load_digits_split("test", data_dir)
        t0 = time.perf_counter()
        variables = train_digits_classifier(x_train, y_train, config)
        seconds = time.perf_counter() - t0
        _, logits = compute_features(make_apply_fn(variables, config), x_test)
        info = dict(
            test_accuracy=float(np.mean(np.argmax(logits, -1) == y_test)),
            num_test=len(y_test),
            train_seconds=round(seconds, 2),
            train_config=config,
            platform=jax.default_backend(),
            jax_version=jax.__version__,
        )
        _write_atomic(os.path.join(cache_dir, "params.msgpack"),
                      serialization.msgpack_serialize(variables))
        _write_atomic(os.path.join(cache_dir, "info.json"),
                      json.dumps(info, indent=2).encode())
        if verbose:
          print(f"digits classifier: test accuracy {info['test_accuracy']:.4f} "
                f"({len(y_test)} images), trained in {seconds:.1f} s, cached in {cache_dir}")
        cached, trained = (variables, info), True
  variables, info = cached
  return make_apply_fn(variables, config), dict(info, loaded_from_cache=not trained)
