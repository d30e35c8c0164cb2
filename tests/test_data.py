"""Tests of the embedded data sets and the deterministic input pipeline."""
import os
import subprocess
import sys

import numpy as np
import pytest

from hierdistill import data
from hierdistill.data import toy2d


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  data.load_digits_split("train", d)  # Builds once for the module.
  return d


# ---------------------------------------------------------------------------------------------
# Digits


def test_digits_splits_sizes_classes_range(digits_dir):
  from hierdistill.data import digits

  for split, n in [("train", 1497), ("test", 300)]:
    x, y = data.load_digits_split(split, digits_dir)
    assert x.shape == (n, 8, 8, 1) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    assert len(x) == digits.SPLIT_SIZES[split]
  _, y_test = data.load_digits_split("test", digits_dir)
  np.testing.assert_array_equal(np.bincount(y_test), np.full(10, 30))  # Stratified.


def test_digits_match_sklearn_and_split_is_a_partition(digits_dir):
  from sklearn.datasets import load_digits
  from hierdistill.data import digits

  ref = load_digits()
  idx = digits.split_indices()
  assert not set(idx["train"]) & set(idx["test"])
  assert len(idx["train"]) + len(idx["test"]) == 1797
  for split in ("train", "test"):
    x, y = data.load_digits_split(split, digits_dir)
    expected = np.round(ref.images[idx[split]] * 255 / 16) / 127.5 - 1.0
    np.testing.assert_allclose(x[..., 0], expected, atol=1e-6)
    np.testing.assert_array_equal(y, ref.target[idx[split]])


def test_digits_rebuild_gives_same_split(digits_dir, tmp_path):
  x1, y1 = data.load_digits_split("test", digits_dir)
  x2, y2 = data.load_digits_split("test", str(tmp_path))
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)


def test_digits_unwritable_dir_is_a_one_line_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  # A directory under a regular file cannot be made, even by root (file modes would not do).
  with pytest.raises(PermissionError, match="not writable") as e:
    data.load_digits_split("train", str(blocker / "tfds"))
  assert "\n" not in str(e.value)


def test_load_dataset_metadata(digits_dir):
  ds = data.load_dataset("digits8x8", "test", data_dir=digits_dir)
  assert (ds.num_classes, ds.shape, len(ds)) == (10, (8, 8, 1), 300)
  ds = data.load_dataset("25gaussians")
  assert (ds.num_classes, ds.shape, ds.x.shape) == (25, (2,), (20_000, 2))
  with pytest.raises(ValueError, match="unknown data set"):
    data.load_dataset("cifar")


def test_importing_data_does_not_import_tensorflow():
  code = ("import sys, hierdistill.data, hierdistill.evaluation; "
          "print(any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets') "
          "for m in sys.modules))")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True)
  assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Toy 2-D


@pytest.mark.parametrize("name,k", [("8gaussians", 8), ("25gaussians", 25)])
def test_toy2d_modes_and_samples(name, k):
  m = toy2d.modes(name)
  assert m.shape == (k, 2)
  x, y = toy2d.sample(3, 5000, name)
  assert x.shape == (5000, 2) and x.dtype == np.float32 and y.dtype == np.int32
  # Every point sits near its own mode, and the modes are balanced.
  dist = np.linalg.norm(x - m[y], axis=1)
  assert dist.max() < 6 * toy2d.STD
  counts = np.bincount(y, minlength=k)
  assert counts.max() - counts.min() <= 1
  # Nearest mode == label: modes are far apart relative to the std.
  nearest = np.argmin(np.linalg.norm(x[:, None] - m[None], axis=-1), axis=1)
  np.testing.assert_array_equal(nearest, y)


def test_toy2d_sample_is_deterministic():
  import jax

  a, b = toy2d.sample(7, 100), toy2d.sample(7, 100)
  np.testing.assert_array_equal(a[0], b[0])
  c, d = toy2d.sample(jax.random.key(1), 100), toy2d.sample(jax.random.key(1), 100)
  np.testing.assert_array_equal(c[0], d[0])
  assert not np.array_equal(toy2d.sample(8, 100)[0], a[0])
  assert not np.array_equal(toy2d.sample(jax.random.key(2), 100)[0], c[0])


# ---------------------------------------------------------------------------------------------
# Pipeline


def _arrays(n=50):
  x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  return x, np.arange(n, dtype=np.int32) % 7


def test_pipeline_same_step_same_batch_across_instances():
  x, y = _arrays()
  p1 = data.InMemoryPipeline(x, y, global_batch_size=16, seed=3)
  p2 = data.InMemoryPipeline(x, y, global_batch_size=16, seed=3)
  for step in [0, 5, 2, 5, 100]:  # Any order of access.
    b1, b2 = p1.batch(step), p2.batch(step)
    np.testing.assert_array_equal(b1["x"], b2["x"])
    np.testing.assert_array_equal(b1["c"], b2["c"])
    assert b1["x"].shape == (16, 3) and b1["c"].dtype == np.int32
  other = data.InMemoryPipeline(x, y, global_batch_size=16, seed=4)
  assert not np.array_equal(other.batch(0)["x"], p1.batch(0)["x"])


def test_pipeline_process_slices_concatenate_to_global_batch():
  x, y = _arrays()
  single = data.InMemoryPipeline(x, y, 12, seed=0)
  parts = [data.InMemoryPipeline(x, y, 12, seed=0, process_index=i, process_count=3)
           for i in range(3)]
  for step in range(10):
    glob = single.batch(step)
    local = [p.batch(step) for p in parts]
    assert all(b["x"].shape == (4, 3) for b in local)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in local]), glob["x"])
    np.testing.assert_array_equal(np.concatenate([b["c"] for b in local]), glob["c"])


def test_pipeline_every_example_once_per_epoch_across_straddling_batches():
  n, bs = 50, 16  # 50 / 16: batches straddle epoch boundaries.
  x, y = _arrays(n)
  p = data.InMemoryPipeline(x, y, bs, seed=1)
  stream = np.concatenate([p.global_indices(s) for s in range(n * 3 // bs + 2)])
  for e in range(3):
    epoch = stream[e * n:(e + 1) * n]
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  # The epoch orders differ (a fresh permutation each epoch).
  assert not np.array_equal(stream[:n], stream[n:2 * n])
  # Rows are the examples the indices name.
  np.testing.assert_array_equal(p.batch(3)["x"][:, 0], p.global_indices(3).astype(np.float32))


def test_pipeline_resume_gives_identical_batches():
  x, y = _arrays()
  uninterrupted = data.InMemoryPipeline(x, y, 8, seed=5).iterate(0)
  reference = [next(uninterrupted) for _ in range(20)]
  resumed = data.InMemoryPipeline(x, y, 8, seed=5).iterate(13)  # Fresh object, saved step 13.
  for step in range(13, 20):
    b = next(resumed)
    np.testing.assert_array_equal(b["x"], reference[step]["x"])
    np.testing.assert_array_equal(b["c"], reference[step]["c"])


def test_pipeline_batch_larger_than_data():
  x, y = _arrays(5)
  p = data.InMemoryPipeline(x, y, 12, seed=0)
  idx = np.concatenate([p.global_indices(0), p.global_indices(1)])
  for e in range(4):
    np.testing.assert_array_equal(np.sort(idx[5 * e:5 * e + 5]), np.arange(5))


def test_pipeline_validates_batch_divisibility():
  x, y = _arrays()
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.InMemoryPipeline(x, y, 10, seed=0, process_index=0, process_count=4)
