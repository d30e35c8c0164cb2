"""hierdistill: Hierarchical Distillation of diffusion/flow teachers into one-step generators.

Import what you need from the submodules; `hierdistill.losses` is pure JAX and pulls in
nothing else of the package.
"""

__version__ = "0.1.0"
