"""Fashion-MNIST from a tiny mock of its IDX files (never the Debian package): the tfds build,
the publisher's order and split, the one-line errors, the feature net's cache, and the ':tiny'
chain end to end."""
import dataclasses
import gzip
import json
import os

import jax
import numpy as np
import pytest

from experiments import fashion
from hierdistill import data as data_lib
from hierdistill import pipeline
from hierdistill.config_checks import ConfigError
from hierdistill.data import fashion_mnist
from hierdistill.evaluation import feature_net

NUM_TRAIN, NUM_TEST = 40, 20


def write_idx(path, array: np.ndarray) -> None:
  """A gzipped IDX file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian int32 dims."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_mock(directory, seed: int = 0) -> dict:
  """The four files, NUM_TRAIN / NUM_TEST images; returns {split: (images, labels)}."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)  # every class, shuffled
    image_file, label_file = fashion_mnist.FILES[split]
    write_idx(os.path.join(directory, image_file), images)
    write_idx(os.path.join(directory, label_file), labels)
    arrays[split] = (images, labels)
  return arrays


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
  """(data_dir, arrays) with FASHION_MNIST_DIR pointing at the mock for the whole module."""
  idx_dir = str(tmp_path_factory.mktemp("fashion_idx"))
  arrays = write_mock(idx_dir)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fashion_mnist.DIR_ENV, idx_dir)
    yield str(tmp_path_factory.mktemp("tfds")), arrays


def test_build_shapes_labels_split_sizes_and_order(mock):
  data_dir, arrays = mock
  builder = fashion_mnist.builder(data_dir)
  assert builder.info.splits["train"].num_examples == NUM_TRAIN
  assert builder.info.splits["test"].num_examples == NUM_TEST
  assert builder.info.features["label"].names[9] == "Ankle boot"
  for split in ("train", "test"):
    ds = data_lib.load_dataset("fashion_mnist", split, data_dir=data_dir)
    images, labels = arrays[split]
    assert ds.x.shape == (len(images), 28, 28, 1) and ds.x.dtype == np.float32
    assert ds.shape == (28, 28, 1) and ds.num_classes == 10
    # The publisher's order, although tfds stores the examples in hash order.
    np.testing.assert_array_equal(ds.y, labels)
    np.testing.assert_allclose(ds.x[..., 0], images / 127.5 - 1.0, atol=1e-6)
    assert ds.x.min() >= -1.0 and ds.x.max() <= 1.0


def test_absent_files_say_how_to_install(tmp_path, monkeypatch):
  empty = tmp_path / "nothing_here"
  empty.mkdir()
  monkeypatch.setenv(fashion_mnist.DIR_ENV, str(empty))
  with pytest.raises(ConfigError) as e:
    data_lib.load_dataset("fashion_mnist", "train", data_dir=str(tmp_path / "tfds"))
  message = str(e.value)
  assert "\n" not in message and str(empty) in message
  assert "apt-get install dataset-fashion-mnist" in message and "FASHION_MNIST_DIR" in message
  assert not (tmp_path / "tfds" / "fashion_mnist").exists()  # nothing half-built


@pytest.mark.parametrize("damage", ["bad_magic", "truncated", "not_gzip", "wrong_size"])
def test_malformed_idx_file_is_one_line_error(tmp_path, monkeypatch, damage):
  idx_dir = str(tmp_path / "idx")
  write_mock(idx_dir)
  path = os.path.join(idx_dir, fashion_mnist.FILES["train"][0])
  if damage == "bad_magic":  # a labels file where the images should be
    write_idx(path, np.zeros(NUM_TRAIN, np.uint8))
  elif damage == "truncated":  # the header promises 40 images, the data holds 39 and a bit
    with gzip.open(path, "rb") as f:
      raw = f.read()
    with gzip.open(path, "wb") as f:
      f.write(raw[:-100])
  elif damage == "not_gzip":
    with open(path, "wb") as f:
      f.write(b"<html>not found</html>")
  else:  # 32x32 images are not Fashion-MNIST
    write_idx(path, np.zeros((NUM_TRAIN, 32, 32), np.uint8))
  monkeypatch.setenv(fashion_mnist.DIR_ENV, idx_dir)
  with pytest.raises(ConfigError) as e:
    data_lib.load_dataset("fashion_mnist", "train", data_dir=str(tmp_path / "tfds"))
  assert "\n" not in str(e.value) and path in str(e.value)


def test_feature_net_is_cached_per_data_set(mock, monkeypatch):
  data_dir, _ = mock
  tiny = dict(feature_net.FASHION_TRAIN_CONFIG, steps=3, batch_size=16)
  apply_fn, info = feature_net.load_or_train_classifier("fashion_mnist", data_dir,
                                                        verbose=False, train_config=tiny)
  assert not info["loaded_from_cache"] and info["num_test"] == NUM_TEST
  assert 0.0 <= info["test_accuracy"] <= 1.0
  assert info["dataset"] == "fashion_mnist" and info["shape"] == [28, 28, 1]
  with open(os.path.join(data_dir, "fashion_mnist_classifier", "info.json")) as f:
    assert json.load(f)["test_accuracy"] == info["test_accuracy"]
  feats, logits = feature_net.compute_features(apply_fn, np.zeros((5, 28, 28, 1)), batch_size=4)
  assert feats.shape == (5, tiny["feature_dim"]) and logits.shape == (5, 10)

  def no_training(*args, **kwargs):
    raise AssertionError("retrained although cached")

  monkeypatch.setattr(feature_net, "train_classifier", no_training)
  _, again = feature_net.load_or_train_classifier("fashion_mnist", data_dir, verbose=False,
                                                  train_config=tiny)
  assert again["loaded_from_cache"]
  # Another training config is another net: the cache does not answer for it.
  with pytest.raises(AssertionError, match="retrained"):
    feature_net.load_or_train_classifier("fashion_mnist", data_dir, verbose=False,
                                         train_config=dict(tiny, steps=4))


@pytest.mark.slow  # about 80 s on 2 busy cores: three train steps and the samplers compile
def test_tiny_chain_end_to_end(mock, tmp_path, monkeypatch):
  data_dir, _ = mock
  # A feature net of a few steps: the mock has 40 images, and the real one trains for minutes.
  spec = feature_net.CLASSIFIERS["fashion_mnist"]
  monkeypatch.setitem(feature_net.CLASSIFIERS, "fashion_mnist", dataclasses.replace(
      spec, train_config=dict(spec.train_config, steps=3, batch_size=16)))
  config = fashion.get_config("tiny")
  config.data.data_dir = data_dir
  assert (28 // config.model.patch_size) ** 2 >= 49  # the tokens the AWD chooses among
  workdir = str(tmp_path / "run")
  summary = pipeline.run(config, workdir, devices=jax.devices()[:1])
  for stage in ("teacher", "trajectory", "distribution"):
    assert summary["stages"][stage]["status"] == "trained"
    assert os.path.getsize(summary["stages"][stage]["samples"]) > 0
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["feature_net"] == "FD-fashion"
  assert 0.0 <= metrics["classifier_test_accuracy"] <= 1.0
  assert metrics["reference"] == f"fashion_mnist train split, {NUM_TRAIN} examples"
  for row in metrics["rows"]:
    assert np.isfinite(row["FD-fashion"]) and row["FD-fashion"] >= 0
    assert "IS-fashion" in row and 0 <= row["class_accuracy"] <= 1


def test_full_config_uses_49_tokens_and_a_reference_subset():
  config = fashion.get_config()
  assert config.data.name == "fashion_mnist"
  assert (config.model.input_size // config.model.patch_size) ** 2 == 49
  assert max(config.model.feature_layers) < config.model.depth
  assert 0 < config.eval.reference_size < fashion_mnist.SPLIT_SIZES["train"]
  with pytest.raises(ValueError, match="unknown variant"):
    fashion.get_config("huge")
