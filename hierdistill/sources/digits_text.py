"""The text-to-image miniature (config.data.name 'digits8x8_text'): the 8x8 digits, each with a
caption measured from its pixels ("a bold, right-leaning seven"), encoded once by the frozen
word encoder of data/digits_text.py. The null condition is the empty prompt's encoding.

The stage grids show rows of GRID_COLUMNS samples that share one caption, printed under the
row. The eval asks for the captions of the training digits (so the asked words follow the
reference set's distribution), sorted so that samples with one caption sit together; its grids
pick rows of one caption from all the eval's samples so that every stroke and slant word pair
shows (`spread_rows`), each caption printed under its row. The scorer adds to the digits columns (FD-digits, precision, recall, IS-digits, class
accuracy of the digit the caption names) the caption agreement: the share of samples whose
measured stroke and slant are the words asked for (and each attribute alone).
"""
from __future__ import annotations

import jax
import numpy as np

from hierdistill import conditions as cond_lib
from hierdistill import data as data_lib
from hierdistill.data import digits_text as text_lib
from hierdistill.evaluation import embedded as ev_embedded
from hierdistill.evaluation import grids
from hierdistill.sources.base import DataSource, data_dir_of
from hierdistill.sources.embedded import load_train_set

GRID_COLUMNS = 8  # samples per caption in the stage grids
EVAL_SALT = 0x7E47  # the order in which the eval visits the training captions


class DigitsTextSource(DataSource):
  """Digits with measured captions (see the module docstring)."""

  image_set = "digits8x8"  # its images, scored by the digits' classifier

  def __init__(self, config, workdir: str, mesh):
    super().__init__(config, workdir, mesh)
    # The images are the class-conditional digits'; the captions replace the labels.
    ds = load_train_set(_digits_data(config.data))
    self.name, self.x, self.y = config.data.name, ds.x, ds.y
    self.data_dir = data_dir_of(config.data)
    self.shape, self.num_classes = tuple(ds.shape), ds.num_classes
    attributes = text_lib.measure_attributes(self.x)
    self.thresholds = text_lib.fit_thresholds(attributes, self.y, self.num_classes)
    self.words = text_lib.bucket(attributes, self.y, self.thresholds)  # (N, 2) stroke, slant
    self.captions = [text_lib.caption(int(k), int(s), int(l))
                     for k, (s, l) in zip(self.y, self.words)]
    self.encoded = text_lib.encode(self.captions)
    self.conditions = self.condition_kind(config)

  def make_pipeline(self, global_batch_size: int, seed: int):
    return data_lib.InMemoryPipeline(
        self.x, self.encoded, global_batch_size=global_batch_size, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  @classmethod
  def condition_kind(cls, config) -> cond_lib.Text:
    """The text kind whose null is the empty prompt's encoding."""
    del config  # the encoder is fixed
    null = text_lib.encode([""])
    return cond_lib.Text(null["embeddings"][0], null["mask"][0])

  @classmethod
  def example_prompts(cls, config) -> tuple:
    """One caption a digit, stroke and slant varying: what the grids ask."""
    del config
    return tuple(text_lib.caption(k, k % 3, (k // 3 + k) % 3) for k in range(10))

  @classmethod
  def conditions_from_prompts(cls, config, prompts) -> dict:
    """Prompts in the digits vocabulary ("a bold, right-leaning seven"), encoded by the frozen
    word encoder the captions were encoded with."""
    del config
    return text_lib.encode(list(prompts))

  # -- what is asked -----------------------------------------------------------------------------

  def grid_asks(self, n: int) -> np.ndarray:
    """(n, 3) (label, stroke, slant) of the grid: row i asks for digit i % 10 with one of the
    nine word pairs, each row GRID_COLUMNS samples of one caption."""
    row = np.arange(n) // GRID_COLUMNS
    return np.stack([row % self.num_classes, row % 3, (row // 3 + row) % 3], axis=1)

  def eval_asks(self, num_samples: int) -> np.ndarray:
    """(num_samples, 3): the (label, stroke, slant) of training digits in a fixed random order,
    one digit a sample, so that the asked words follow the distribution of the reference set
    (the training split); sorted by (stroke, slant, label), so that samples of one caption sit
    together (the eval's grid picks its rows from all of them: `spread_rows`).

    Why one digit a sample: asking few captions many times each measures the distance to a
    different distribution. 125 training captions 8 times each put the training digits
    themselves at FD-digits 12.8 from the training split (1,000 distinct ones: 0.3).
    """
    order = np.random.default_rng([self.config.seed, EVAL_SALT]).permutation(len(self.y))
    rows = order[np.arange(num_samples) % len(order)]
    asks = np.concatenate([self.y[rows, None], self.words[rows]], axis=1)
    return asks[np.lexsort((asks[:, 0], asks[:, 2], asks[:, 1]))]

  def conditions_of(self, asks: np.ndarray) -> dict:
    return text_lib.encode(captions_of(asks))

  def grid_conditions(self, n: int) -> dict:
    return self.conditions_of(self.grid_asks(n))

  def eval_conditions(self, num_samples: int) -> dict:
    return self.conditions_of(self.eval_asks(num_samples))

  def save_grid(self, samples, path: str, asks=None) -> None:
    """The samples in rows of one caption, printed under the row (default: the grid's
    captions)."""
    asks = self.grid_asks(len(samples)) if asks is None else asks
    grids.save_captioned_grid(np.asarray(samples), captions_of(asks), path,
                              max_columns=GRID_COLUMNS)

  def make_scorer(self, chain):
    return CaptionEvaluator(chain)


def captions_of(asks: np.ndarray) -> list:
  return [text_lib.caption(int(k), int(s), int(l)) for k, s, l in asks]


def spread_rows(asks: np.ndarray, n: int) -> np.ndarray:
  """Indices of n of the asks for a grid that shows the words at work: rows of one caption,
  row i with the i-th of the nine (stroke, slant) pairs in grid_asks' order (so the first nine
  rows hold every pair, each word three times) and digit i % 10 where the asks hold that
  caption, else the pair's most asked digit. Rows are n // 9 samples wide (at most
  GRID_COLUMNS), so even a small grid shows all nine pairs. The sorted asks alone would fill a
  grid with their first caption ("a thin, left-leaning ...")."""
  width = int(np.clip(n // 9, 1, GRID_COLUMNS))
  by_caption = {}
  for i, ask in enumerate(map(tuple, np.asarray(asks))):
    by_caption.setdefault(ask, []).append(i)
  taken = {caption: 0 for caption in by_caption}
  picked, row, misses = [], 0, 0
  while len(picked) < n and misses < 9:
    pair = (row % 3, (row // 3 + row) % 3)
    row += 1
    left = {k: len(v) - taken[(k,) + pair] for (k, *p), v in by_caption.items()
            if tuple(p) == pair and len(v) > taken[(k,) + pair]}
    if not left:  # this pair is never asked, or all its samples are shown
      misses += 1
      continue
    misses = 0
    digit = (row - 1) % 10 if (row - 1) % 10 in left else max(left, key=lambda k: (left[k], -k))
    caption = (digit,) + pair
    start = taken[caption]
    chosen = by_caption[caption][start:start + min(width, n - len(picked))]
    taken[caption] += len(chosen)
    picked += chosen
  return np.asarray(picked, np.int64)


def _digits_data(data_config):
  """The digits' own data config (same data dir): the images and labels behind the captions."""
  cfg = data_config.copy_and_resolve_references()
  cfg.name = "digits8x8"
  return cfg


def caption_agreement(samples: np.ndarray, asks: np.ndarray, thresholds) -> dict:
  """Shares of samples whose measured stroke, slant, and both, are the words asked for."""
  measured = text_lib.bucket(text_lib.measure_attributes(samples), asks[:, 0], thresholds)
  same = measured == asks[:, 1:]
  return {"caption_agreement": float(np.mean(same.all(axis=1))),
          "stroke_agreement": float(np.mean(same[:, 0])),
          "slant_agreement": float(np.mean(same[:, 1]))}


class CaptionEvaluator(ev_embedded.Evaluator):
  """The digits scorer with the digit the caption names as the class, plus caption agreement."""

  def __init__(self, chain):
    super().__init__(chain)
    self.asks = chain.source.eval_asks(int(self.cfg.num_samples))

  def measure(self, sample_fn, params, files_prefix=None):
    del files_prefix
    samples = self.samples(sample_fn, params)
    self.last_samples = samples
    row = self.scorer(samples, self.asks[:, 0])
    row.update(caption_agreement(samples, self.asks, self.chain.source.thresholds))
    return row, samples

  def save_grid(self, samples, path: str) -> None:
    """len(samples) of the last measured samples, rows of one caption spread over the words
    (spread_rows); `samples` is the head of those that the driver passes."""
    pool = self.last_samples if self.last_samples is not None else samples
    rows = spread_rows(self.asks[:len(pool)], len(samples))
    self.chain.source.save_grid(np.asarray(pool)[rows], path, asks=self.asks[rows])

  def describe(self) -> dict:
    real = caption_agreement(self.chain.source.x, np.concatenate(
        [self.chain.source.y[:, None], self.chain.source.words], axis=1),
        self.chain.source.thresholds)
    return {**super().describe(),
            "captions": "measured stroke and slant, class terciles of the training split",
            "real_caption_agreement": real["caption_agreement"]}
