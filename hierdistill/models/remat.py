"""Which activations a rematerialised block keeps for the backward pass (config model.remat_policy).

With model.remat = True every transformer block is wrapped in `nn.remat` under one of these
policies, named as jax.checkpoint_policies names them:
  nothing_saveable                  keep only the block's inputs; recompute the whole block in
                                    the backward pass (least memory, one extra forward).
  dots_with_no_batch_dims_saveable  keep the outputs of the weight matmuls (not those of
                                    attention's batched q k^T and p v); recompute the rest.
  dots_saveable                     keep every matmul output, attention's included.
  everything_saveable               keep everything: the memory of no remat, the graph of one.
The policy changes memory and time only, never the numbers (tests/test_levers.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax

POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable",
            "everything_saveable")


def remat_policy(name: str) -> Optional[Callable]:
  """The jax.checkpoint policy of that name (ValueError naming the choices otherwise)."""
  if name not in POLICIES:
    raise ValueError(f"Unknown model remat_policy={name!r}; valid: {', '.join(POLICIES)}.")
  return getattr(jax.checkpoint_policies, name)
