"""The embedded, class-conditional data sets: 8x8 digits (scikit-learn's, built once into a
local tfds set), 28x28 Fashion-MNIST (built once from its IDX files) and the 2-D mixtures of
Gaussians. Held in memory, batched by data.InMemoryPipeline, scored by
evaluation/embedded.Evaluator against the training split."""
from __future__ import annotations

import jax
import numpy as np

from hierdistill import conditions as cond_lib
from hierdistill import data as data_lib
from hierdistill.config_checks import ConfigError
from hierdistill.evaluation import embedded as ev_embedded
from hierdistill.evaluation import grids
from hierdistill.sources.base import DataSource, data_dir_of


def load_train_set(data_config) -> data_lib.ArrayDataset:
  """The training split in memory; with data.unconditional, every label is 0 of 1 class.
  ConfigError (one line) when it cannot be built or read."""
  data_dir = data_dir_of(data_config)
  try:
    ds = data_lib.load_dataset(data_config.name, "train", data_dir=data_dir,
                               seed=data_config.seed)
  except (FileNotFoundError, PermissionError) as e:  # not built, not readable, not writable
    reason = e.strerror or str(e).split(";")[0]
    raise ConfigError(f"config.data.name={data_config.name!r} cannot be loaded from "
                      f"config.data.data_dir={data_dir!r}: {reason}; point --config.data.data_dir "
                      "to where it is, or to a writable directory.") from None
  if data_config.get("unconditional", False):
    ds = data_lib.ArrayDataset(ds.name, ds.x, np.zeros_like(ds.y), 1, ds.shape)
  return ds


class InMemorySource(DataSource):
  """A class-conditional set held in memory: x (N, ...) and labels y (N,)."""

  def __init__(self, config, workdir: str, mesh):
    super().__init__(config, workdir, mesh)
    self.data_dir = data_dir_of(config.data)
    ds = load_train_set(config.data)
    self.name, self.x, self.y = ds.name, ds.x, ds.y
    self.shape, self.num_classes = tuple(ds.shape), ds.num_classes
    self.conditions = cond_lib.Labels(self.num_classes)

  def make_pipeline(self, global_batch_size: int, seed: int):
    return data_lib.InMemoryPipeline(
        self.x, self.y, global_batch_size=global_batch_size, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  def make_scorer(self, chain):
    return ev_embedded.Evaluator(chain)


class DigitsSource(InMemorySource):
  """8x8 digits, 10 classes: image grids."""

  def save_grid(self, samples, path: str) -> None:
    """The samples tiled in rows; the labels cycle along each row."""
    grids.save_image_grid(samples, path)


class FashionMnistSource(InMemorySource):
  """28x28 Fashion-MNIST, 10 classes (data/fashion_mnist.py): image grids, a column a class."""

  def save_grid(self, samples, path: str) -> None:
    grids.save_image_grid(samples, path, nrow=self.num_classes)


class Toy2DSource(InMemorySource):
  """2-D mixtures of Gaussians: scatter plots of the samples over the real points."""

  @classmethod
  def example_shape(cls, config) -> tuple:
    return (2,)

  def save_grid(self, samples, path: str) -> None:
    grids.scatter_png([self.x, samples], ["grey", "red"], path)
