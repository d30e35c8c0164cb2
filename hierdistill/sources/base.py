"""What the chain asks of a data source (sources/__init__.py registers them)."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from hierdistill import conditions as cond_lib
from hierdistill.config_checks import ConfigError

GRID_SALT = 0x9E1D  # the grid's noise and conditions are the same in every stage and every run


def data_dir_of(data_config) -> str:
  """The tfds data dir: config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return (data_config.data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.expanduser("~/tensorflow_datasets"))


class DataSource:
  """One data set as the chain sees it. Built by open_source(config, workdir, mesh), which runs
  before anything compiles: a subclass opens (or checks) its data in __init__ and raises
  ConfigError, one line, for what the user can fix.

  Attributes a subclass sets: name, shape (one example's), num_classes, conditions
  (conditions.Labels or conditions.Text).
  Methods it provides:
    make_pipeline(global_batch_size, seed)  this process's training input: batch(step) ->
        {'x', 'c'}, and `images` whose shape[1:] is one example's (stages/loop.py); the order a
        pure function of (seed, step), so that resume is exact
    grid_conditions(n)                      the conditions of the sample grids (host arrays)
    save_grid(samples, path)                a PNG of the grid's samples (grid order)
    make_scorer(chain)                      the eval stage's scorer (evaluation/driver.py)
  """

  name: str
  shape: tuple
  num_classes: int
  conditions: Any

  def __init__(self, config, workdir: str, mesh):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh

  # -- what a generator needs, from the config alone (no data opened) ------------------------------
  # A trained generator (generator.py) is loaded without its data: these class methods answer
  # from a run's config (config.model, config.data) what the opened source would.

  @classmethod
  def example_shape(cls, config) -> tuple:
    """One example's shape: (H, W, C) of the model's input (images or latents)."""
    m = config.model
    return (int(m.input_size), int(m.input_size), int(m.in_channels))

  @classmethod
  def condition_kind(cls, config):
    """The kind of condition of this source's batches (conditions.py), with its null."""
    return cond_lib.Labels(int(config.model.num_classes))

  @classmethod
  def example_prompts(cls, config) -> tuple:
    """A few prompts that show what a text model of this source can do (none: labels)."""
    del config
    return ()

  @classmethod
  def conditions_from_prompts(cls, config, prompts) -> Any:
    """The condition pytree of a list of prompts, as this source encodes its captions; a
    source labelled by class has none (ValueError, one line)."""
    del prompts
    raise ValueError(f"the data source {config.data.name!r} is labelled by class: give class "
                     "labels, not prompts.")

  # -- checks ------------------------------------------------------------------------------------

  def check_model(self) -> None:
    """The model is built for this data: its class count (or caption width) and example shape."""
    m = self.config.model
    if self.conditions.kind == "labels":
      if m.get("caption_channels", 0):
        raise ConfigError(f"config.model.caption_channels={m.caption_channels} makes a text "
                          f"model, but {self.name!r} is labelled by class; set "
                          "--config.model.caption_channels=0.")
      if self.num_classes != m.num_classes:
        raise ConfigError(
            f"config.model.num_classes={m.num_classes} but the data set {self.name!r} has "
            f"{self.num_classes} classes; set --config.model.num_classes={self.num_classes}.")
    elif m.get("caption_channels", 0) != self.conditions.width:
      raise ConfigError(
          f"config.model.caption_channels={m.get('caption_channels', 0)} but the captions of "
          f"{self.name!r} are encoded to width {self.conditions.width}; set "
          f"--config.model.caption_channels={self.conditions.width}.")
    if m.name == "dit" and tuple(self.shape) != (m.input_size, m.input_size, m.in_channels):
      h, _, c = self.shape if len(self.shape) == 3 else (None, None, None)
      raise ConfigError(
          f"config.model expects {m.input_size}x{m.input_size}x{m.in_channels} images but "
          f"{self.name!r} has examples of shape {tuple(self.shape)}; set "
          f"--config.model.input_size={h} --config.model.in_channels={c}.")

  # -- grids -------------------------------------------------------------------------------------

  def grid(self) -> tuple[np.ndarray, Any]:
    """Fixed (noise, conditions) of the sample grids: the same in every stage and every run."""
    n = int(self.config.sample.grid_size)
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), GRID_SALT)
    noise = np.asarray(jax.random.normal(key, (n,) + tuple(self.shape)))
    return noise, self.grid_conditions(n)

  def grid_conditions(self, n: int) -> Any:
    """Labels cycling through the classes (a class-conditional source's default)."""
    return np.arange(n, dtype=np.int32) % self.num_classes

  def eval_conditions(self, num_samples: int) -> Any:
    """The condition of each eval sample; labels cycle through the classes."""
    return np.arange(num_samples, dtype=np.int32) % self.num_classes
