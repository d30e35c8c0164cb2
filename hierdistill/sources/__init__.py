"""Data sources: one registry of what a run can train on.

A data source owns everything that depends on the data: its dataset (opened and checked before
anything compiles), the kind of condition its batches carry and that condition's null
(conditions.py), its input pipeline, its sample grids and its scorer for the eval stage. The
chain (pipeline.py) and the eval driver (evaluation/driver.py) know none of them by name: they
ask `open_source(config, workdir, mesh)` and use the interface of `base.DataSource`.

Adding a data source is one new module here and one line in SOURCES. Modules are imported only
when their source is opened, so naming a source costs nothing (config checks read NAMES).
"""
from __future__ import annotations

import importlib

# config.data.name -> "module:class". The toy mixtures share one class.
SOURCES = {
    "digits8x8": "hierdistill.sources.embedded:DigitsSource",
    "fashion_mnist": "hierdistill.sources.embedded:FashionMnistSource",
    "8gaussians": "hierdistill.sources.embedded:Toy2DSource",
    "25gaussians": "hierdistill.sources.embedded:Toy2DSource",
    "digits8x8_text": "hierdistill.sources.digits_text:DigitsTextSource",
    "imagenet256_latents": "hierdistill.sources.imagenet:ImageNetSource",
    "t2i_latents": "hierdistill.sources.mjhq:T2ISource",
}
NAMES = tuple(SOURCES)


def source_class(name: str) -> type:
  """The DataSource class registered for config.data.name (ValueError for an unknown name)."""
  if name not in SOURCES:
    raise ValueError(f"config.data.name={name!r}: no such data source; choose from {NAMES}.")
  module, cls = SOURCES[name].split(":")
  return getattr(importlib.import_module(module), cls)


def open_source(config, workdir: str, mesh):
  """The data source of config.data, opened and checked (ConfigError on a user mistake)."""
  return source_class(config.data.name)(config, workdir, mesh)
