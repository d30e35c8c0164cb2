"""Tests of the sample metrics, the digits feature net and the pictures."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from hierdistill import evaluation
from hierdistill.data import toy2d
from hierdistill.evaluation import feature_net


# ---------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)  # stds
  fd = evaluation.frechet_distance(m1, np.diag(s1 ** 2), m2, np.diag(s2 ** 2))
  np.testing.assert_allclose(fd, np.sum((m1 - m2) ** 2 + (s1 - s2) ** 2), rtol=1e-10)


def test_frechet_distance_full_covariances_zero_and_symmetry():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
  m1, m2 = rng.normal(size=6), rng.normal(size=6)
  assert evaluation.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)
  fd12 = evaluation.frechet_distance(m1, s1, m2, s2)
  np.testing.assert_allclose(fd12, evaluation.frechet_distance(m2, s2, m1, s1), rtol=1e-9)
  # Independent route: tr((S1 S2)^1/2) = sum of sqrt of the (real, >= 0) eigenvalues of S1 S2.
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)))
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  np.testing.assert_allclose(fd12, expected, rtol=1e-8)


def test_frechet_distance_singular_covariance_and_feature_statistics():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(10, 32))  # 10 samples in 32-D: a rank-9 covariance.
  mu, sigma = evaluation.feature_statistics(f)
  np.testing.assert_allclose(mu, f.mean(0))
  np.testing.assert_allclose(sigma, np.cov(f, rowvar=False))
  fd = evaluation.frechet_distance(mu, sigma, mu, sigma)
  assert np.isfinite(fd) and fd == pytest.approx(0.0, abs=1e-8)
  shifted = evaluation.frechet_distance_from_features(f, f + 3.0)
  np.testing.assert_allclose(shifted, 32 * 9.0, rtol=1e-8)  # Only the means moved.


# ---------------------------------------------------------------------------------------------
# Inception score and accuracy


def test_inception_score_bounds():
  n, c = 1000, 10
  mean, std = evaluation.inception_score(np.zeros((n, c)), splits=10)
  assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
  confident = np.eye(c)[np.arange(n) % c]  # One-hot, balanced: the maximum, C.
  mean, _ = evaluation.inception_score(confident, splits=10, from_logits=False)
  assert mean == pytest.approx(c)
  mean, _ = evaluation.inception_score(30.0 * confident, splits=10)  # As logits.
  assert mean == pytest.approx(c, rel=1e-6)
  collapsed = np.eye(c)[np.zeros(n, int)]  # Confident but one class: 1.
  assert evaluation.inception_score(collapsed, splits=1, from_logits=False)[0] == pytest.approx(1)


def test_class_accuracy():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
  assert evaluation.class_accuracy(logits, np.array([0, 1, 1, 1])) == 0.75


# ---------------------------------------------------------------------------------------------
# Precision / recall


def _brute_force_pr(real, fake, k):
  def radii(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]

  def inside(q, ref, r):
    return np.any(np.linalg.norm(q[:, None] - ref[None], axis=-1) <= r[None], axis=1)

  return inside(fake, real, radii(real)).mean(), inside(real, fake, radii(fake)).mean()


def test_precision_recall_matches_brute_force_for_any_block_size():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(300, 8))
  fake = 1.3 * rng.normal(size=(300, 8)) + 0.3  # Same N: the programs compile once.
  expected = _brute_force_pr(real, fake, 3)
  for block in (64, 4096):  # Many blocks with padding; one block.
    np.testing.assert_allclose(evaluation.precision_recall(real, fake, 3, block), expected,
                               atol=1.5 / 300)


def test_precision_recall_identical_disjoint_and_half_modes():
  x, _ = toy2d.sample(0, 2000, "25gaussians")
  assert evaluation.precision_recall(x, x) == (1.0, 1.0)
  assert evaluation.precision_recall(x, x + 100.0) == (0.0, 0.0)
  # Fake data from the 13 modes with an even index, in the same density per mode.
  fake, y = toy2d.sample(1, 4000, "25gaussians")
  fake = fake[y % 2 == 0][:1000]
  precision, recall = evaluation.precision_recall(x, fake)
  assert precision > 0.95
  assert recall == pytest.approx(13 / 25, abs=0.06)


# ---------------------------------------------------------------------------------------------
# Mode coverage


def test_mode_coverage_all_and_half_modes():
  modes, std = toy2d.modes("8gaussians"), toy2d.STD
  x, y = toy2d.sample(0, 800, "8gaussians")
  assert evaluation.mode_coverage(x, modes, std) == 1.0
  assert evaluation.off_mode_fraction(x, modes, std) < 0.03
  half = x[y < 4]
  assert evaluation.mode_coverage(half, modes, std) == 0.5
  # A few stragglers in the other modes (under a tenth of their fair share) do not count.
  leaked = np.concatenate([half, x[y >= 4][:8]])
  assert evaluation.mode_coverage(leaked, modes, std) == 0.5
  np.testing.assert_array_equal(evaluation.mode_counts(half, modes, std)[4:], 0)
  # Points between modes (the blur of a mean regressor) are off-mode.
  between = 0.5 * (modes[:4] + modes[1:5])
  assert evaluation.off_mode_fraction(between, modes, std) == 1.0
  assert evaluation.mode_coverage(np.zeros((100, 2)), modes, std) == 0.0


def test_class_coverage_sees_a_dropped_class_that_labels_would_hide():
  data = np.repeat(np.arange(4), [40, 30, 20, 10])  # an uneven data set: shares .4 .3 .2 .1
  q = evaluation.class_histogram(data, 4)
  np.testing.assert_allclose(q, [0.4, 0.3, 0.2, 0.1])
  assert evaluation.class_coverage(q, q) == 1.0 and evaluation.total_variation(q, q) == 0.0
  # Class 3 drawn at 4% against the data's 10%: under half its rate, so dropped; the 6% of
  # samples moved to class 0 is the total variation.
  p = evaluation.class_histogram(np.repeat(np.arange(4), [46, 30, 20, 4]), 4)
  assert evaluation.class_coverage(p, q) == 0.75
  assert evaluation.total_variation(p, q) == pytest.approx(0.06)
  # Unassigned samples (-1: a point near no mode) are left out of the shares.
  np.testing.assert_allclose(evaluation.class_histogram(np.array([-1, 0, 1, 1]), 2), [1 / 3, 2 / 3])
  assert evaluation.total_variation([1.0, 0.0], [0.0, 1.0]) == 1.0


def test_reference_scorer_coverage_of_points_follows_the_modes(tmp_path):
  from hierdistill.evaluation.embedded import ReferenceScorer
  x, y = toy2d.sample(0, 2000, "8gaussians")
  scorer = ReferenceScorer(x, "8gaussians", str(tmp_path), conditional=False)
  assert scorer(x[:800], None)["class_coverage"] == 1.0
  half = scorer(x[y < 4], None)
  assert half["class_coverage"] == 0.5
  assert half["class_tv"] == pytest.approx(0.5, abs=0.03)


# ---------------------------------------------------------------------------------------------
# Digits classifier


def test_classifier_training_is_deterministic():
  import jax

  x = np.asarray(np.random.default_rng(0).uniform(-1, 1, (256, 8, 8, 1)), np.float32)
  y = np.arange(256, dtype=np.int32) % 10
  # Few steps, but the real batch shape: the compiled step is shared with the test below.
  config = dict(feature_net.TRAIN_CONFIG, steps=15)
  a = feature_net.train_digits_classifier(x, y, config)
  b = feature_net.train_digits_classifier(x, y, config)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for la, lb in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(la, lb)
  untrained = feature_net.train_digits_classifier(x, y, dict(config, steps=0))
  assert not np.array_equal(untrained["params"]["Dense_1"]["kernel"],
                            a["params"]["Dense_1"]["kernel"])


def test_classifier_accuracy_cache_and_features(tmp_path, monkeypatch):
  data_dir = str(tmp_path)
  apply_fn, info = evaluation.load_or_train_digits_classifier(data_dir, verbose=False)
  assert not info["loaded_from_cache"]
  assert info["test_accuracy"] > 0.9
  cache = os.path.join(data_dir, feature_net.CACHE_SUBDIR)
  with open(os.path.join(cache, "info.json")) as f:
    assert json.load(f)["test_accuracy"] == info["test_accuracy"]

  from hierdistill.data import digits

  x, y = digits.load_digits_split("test", data_dir)
  feats, logits = evaluation.compute_features(apply_fn, x, batch_size=128)  # 300: ragged tail.
  assert feats.shape == (300, feature_net.TRAIN_CONFIG["feature_dim"]) and logits.shape == (300, 10)
  assert evaluation.class_accuracy(logits, y) == pytest.approx(info["test_accuracy"])

  def no_training(*args, **kwargs):
    raise AssertionError("retrained although cached")

  monkeypatch.setattr(feature_net, "train_classifier", no_training)
  apply_fn2, info2 = evaluation.load_or_train_digits_classifier(data_dir, verbose=False)
  assert info2["loaded_from_cache"] and info2["test_accuracy"] == info["test_accuracy"]
  feats2, logits2 = evaluation.compute_features(apply_fn2, x, batch_size=128)
  np.testing.assert_array_equal(logits2, logits)
  np.testing.assert_array_equal(feats2, feats)


# ---------------------------------------------------------------------------------------------
# Pictures


def test_save_image_grid_size_and_values(tmp_path):
  images = -np.ones((10, 8, 8, 1), np.float32)
  images[3] = 1.0  # One white tile.
  path = str(tmp_path / "sub" / "grid.png")
  grid = evaluation.save_image_grid(images, path, nrow=4)  # 3 rows of 4; 4x upscale by default.
  with Image.open(path) as im:
    assert im.format == "PNG" and im.mode == "L"
    assert im.size == ((4 * 9 + 1) * 4, (3 * 9 + 1) * 4)  # (width, height)
    np.testing.assert_array_equal(np.asarray(im), grid[..., 0])
  tile = grid[4:4 + 32, 4 + 3 * 36:4 + 3 * 36 + 32, 0]  # Row 0, column 3.
  assert np.all(tile == 255)
  assert np.all(grid[4:4 + 32, 4:4 + 32, 0] == 0)
  rgb = evaluation.save_image_grid(np.zeros((2, 8, 8, 3)), str(tmp_path / "rgb.png"), nrow=2)
  assert rgb.shape == (10 * 4, 19 * 4, 3)


def test_scatter_png(tmp_path):
  real = np.array([[0.0, 0.0], [1.0, 1.0]])
  fake = np.array([[1.0, 1.0]])
  path = str(tmp_path / "scatter.png")
  image = evaluation.scatter_png([real, fake], ["grey", "red"], path, size=101,
                                 extent=(-1, 1, -1, 1), radius=0)
  with Image.open(path) as im:
    assert im.size == (101, 101) and im.mode == "RGB"
  assert tuple(image[50, 50]) == (170, 170, 170)  # (0, 0): the centre, real data in grey.
  assert tuple(image[0, 100]) == (214, 39, 40)  # (1, 1): top right, the sample over it in red.
  assert np.sum(np.any(image != 255, axis=-1)) == 2
