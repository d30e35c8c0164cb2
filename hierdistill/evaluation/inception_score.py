"""Inception Score: exp E_x KL(p(y|x) || p(y)), for any classifier's predictions.

High when every prediction is confident (low entropy of p(y|x)) and the classes are balanced
(high entropy of the marginal p(y)); it lies in [1, num_classes]. With Inception-v3 on ImageNet it
is IS; with the digits classifier it is "IS-digits" and is at most 10.
"""
from __future__ import annotations

import numpy as np


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def inception_score(logits_or_probs, splits: int = 10,
                    from_logits: bool = True) -> tuple[float, float]:
  """Inception Score over `splits` equal parts of the samples, as in the reference code.

  Args:
    logits_or_probs: (N, C) classifier logits (from_logits=True) or probabilities.
    splits: the samples are cut into this many contiguous parts; each part gets its own
      marginal p(y). Use the same value when comparing numbers (10 is the convention).
    from_logits: whether the input are logits (softmax taken here) or probabilities.
  Returns:
    (mean, std) of the per-split scores, floats.
  """
  a = np.asarray(logits_or_probs, dtype=np.float64)
  if a.ndim != 2 or len(a) < splits:
    raise ValueError(f"need (N >= splits={splits}, C) predictions, got shape {a.shape}")
  if from_logits:
    log_p = _log_softmax(a)
    p = np.exp(log_p)
  else:
    # Renormalise; log 0 is replaced by 0 so that 0 * log 0 = 0 (classifiers round confident
    # probabilities to exact zeros).
    p = a / a.sum(axis=-1, keepdims=True)
    log_p = np.log(np.where(p > 0, p, 1.0))
  scores = []
  for part_p, part_log_p in zip(np.array_split(p, splits), np.array_split(log_p, splits)):
    p_y = part_p.mean(axis=0)
    log_p_y = np.log(np.where(p_y > 0, p_y, 1.0))
    kl = np.sum(part_p * (part_log_p - log_p_y), axis=-1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
