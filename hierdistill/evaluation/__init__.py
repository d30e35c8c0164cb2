"""Sample metrics, the digits feature net, and pictures of samples.

One concept a file:
  frechet.py           feature_statistics, frechet_distance (FID with Inception; "FD-digits" here)
  inception_score.py   inception_score (IS; "IS-digits" with the digits classifier)
  precision_recall.py  precision_recall (Kynkaanniemi et al. 2019, k-NN manifolds, blocked in JAX)
  accuracy.py          class_accuracy (does a class-conditional sample show its class?)
  modes.py             mode_coverage, off_mode_fraction (2-D mixtures of Gaussians)
  coverage.py          class_histogram, class_coverage, total_variation (per-class coverage:
                       the samples' label histogram against the data's; mode dropping)
  feature_net.py       load_or_train_digits_classifier, compute_features
  grids.py             save_image_grid, scatter_png (PNG, pillow only)
  token_weights.py     overlay_image, token_weight_stats (where the AWD's token weights land)

Statistics are float64 numpy; networks and the k-NN search run in JAX.
Typical digits evaluation:

    apply_fn, info = evaluation.load_or_train_digits_classifier(data_dir)
    f_real, _ = evaluation.compute_features(apply_fn, real_images)
    f_fake, logits = evaluation.compute_features(apply_fn, samples)
    fd_digits = evaluation.frechet_distance_from_features(f_real, f_fake)
    precision, recall = evaluation.precision_recall(f_real, f_fake)
    is_mean, is_std = evaluation.inception_score(logits)
    acc = evaluation.class_accuracy(logits, sample_labels)
"""
from hierdistill.evaluation.accuracy import class_accuracy
from hierdistill.evaluation.coverage import class_coverage
from hierdistill.evaluation.coverage import class_histogram
from hierdistill.evaluation.coverage import total_variation
from hierdistill.evaluation.feature_net import compute_features
from hierdistill.evaluation.feature_net import load_or_train_digits_classifier
from hierdistill.evaluation.frechet import feature_statistics
from hierdistill.evaluation.frechet import frechet_distance
from hierdistill.evaluation.frechet import frechet_distance_from_features
from hierdistill.evaluation.grids import image_grid
from hierdistill.evaluation.grids import save_image_grid
from hierdistill.evaluation.grids import scatter_image
from hierdistill.evaluation.grids import scatter_png
from hierdistill.evaluation.inception_score import inception_score
from hierdistill.evaluation.modes import assign_modes
from hierdistill.evaluation.modes import mode_counts
from hierdistill.evaluation.modes import mode_coverage
from hierdistill.evaluation.modes import off_mode_fraction
from hierdistill.evaluation.precision_recall import precision_recall

__all__ = [
    "assign_modes", "class_accuracy", "class_coverage", "class_histogram", "compute_features",
    "feature_statistics",
    "frechet_distance", "frechet_distance_from_features", "image_grid", "inception_score",
    "load_or_train_digits_classifier", "mode_counts", "mode_coverage", "off_mode_fraction",
    "precision_recall", "save_image_grid", "scatter_image", "scatter_png", "total_variation",
]
