"""Class accuracy of generated samples under a classifier: does G(e | y) look like class y?"""
from __future__ import annotations

import numpy as np


def class_accuracy(classifier_logits, labels) -> float:
  """Fraction of rows whose argmax matches the label. logits (N, C); labels int (N,)."""
  logits, labels = np.asarray(classifier_logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"need logits (N, C) and labels (N,), got {logits.shape}, {labels.shape}")
  return float(np.mean(np.argmax(logits, axis=-1) == labels))
