"""hierdistill: Hierarchical Distillation of diffusion/flow teachers into one-step generators.

Import what you need from the submodules; `hierdistill.losses` is pure JAX and pulls in
nothing else of the package. `hierdistill.Generator` (generator.py), the trained generator, is
imported on first use, so that importing a submodule stays light.
"""

__version__ = "0.1.0"


def __getattr__(name):
  if name == "Generator":
    from hierdistill.generator import Generator  # pylint: disable=g-import-not-at-top
    return Generator
  raise AttributeError(f"module 'hierdistill' has no attribute {name!r}")
