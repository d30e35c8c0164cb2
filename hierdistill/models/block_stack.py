"""A transformer's stack of blocks: a Python loop of `depth` blocks, or one block scanned `depth`
times (config model.scan_blocks).

Unrolled (the default), block i's params are `blocks_{i}/...`: the published checkpoints'
layout, which the importers and exports speak. Scanned, `blocks/...` holds every block's params
stacked on a leading axis of size depth, and the compiled step holds one block body in a loop
instead of depth copies of it (times remat's recomputation, times the JVP of stage 1): the TPU
compiler then compiles one block, not 28, which is what makes a full-depth plan of an XL model
take minutes instead of tens of minutes (MaxText's scan_layers). The numbers are the same either
way (tests/test_scan_blocks.py); `stack_blocks` and `unstack_blocks` convert the params.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hierdistill.models.remat import remat_policy as policy_of

SCANNED = "blocks"  # the scanned stack's params: one subtree, every leaf (depth, ...)
_UNROLLED = re.compile(r"blocks_(\d+)$")


def apply_blocks(block_cls: type, block_fields: Dict[str, Any], depth: int, x, args: tuple, *,
                 scan: bool, remat: bool, remat_policy: str, keep: Sequence[int] = ()
                 ) -> Tuple[Any, List[Any]]:
  """x after `depth` blocks block_cls(**block_fields)(x, *args), and the outputs of the blocks
  whose indices are in `keep` (in that order). Call from a compact method: the blocks attach to
  its module as `blocks_{i}` (unrolled) or `blocks` (scanned)."""
  if remat:
    # Inside a scan nothing can be common-subexpression-eliminated across the loop, so JAX's
    # guard against it (prevent_cse) only costs time there.
    block_cls = nn.remat(block_cls, policy=policy_of(remat_policy), prevent_cse=not scan)
  if not scan:
    outputs = []
    for i in range(depth):
      x = block_cls(**block_fields, name=f"blocks_{i}")(x, *args)
      outputs.append(x)  # computed anyway; keeping references costs nothing
    return x, [outputs[i] for i in keep]

  def body(block, x, args):
    x = block(x, *args)
    return x, (x if keep else None)

  scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=nn.broadcast, length=depth)
  x, outputs = scanned(block_cls(**block_fields, name=SCANNED), x, args)
  return x, [outputs[i] for i in keep]


def stack_blocks(params: Dict[str, Any]) -> Dict[str, Any]:
  """A network's params in the unrolled layout (blocks_0 ... blocks_{depth-1}) -> the scanned
  one (blocks, each leaf stacked on a new leading axis); other entries unchanged."""
  indices = sorted(int(m.group(1)) for m in map(_UNROLLED.match, params) if m)
  if not indices:
    raise ValueError("stack_blocks: these params hold no blocks_{i}; they are already stacked "
                     "or are not a transformer's.")
  if indices != list(range(len(indices))):
    raise ValueError(f"stack_blocks: the blocks are numbered {indices}, not 0..{len(indices) - 1}.")
  blocks = [params[f"blocks_{i}"] for i in indices]
  out = {k: v for k, v in params.items() if not _UNROLLED.match(k)}
  out[SCANNED] = jax.tree.map(lambda *leaves: _stack(leaves), *blocks)
  return out


def unstack_blocks(params: Dict[str, Any]) -> Dict[str, Any]:
  """The inverse of stack_blocks: blocks (leading axis depth) -> blocks_0 ... blocks_{depth-1}."""
  if SCANNED not in params:
    raise ValueError("unstack_blocks: these params hold no stacked 'blocks'.")
  stacked = params[SCANNED]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != SCANNED}
  for i in range(depth):
    out[f"blocks_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  return out


def _stack(leaves):
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)  # host params (an importer's) stay on the host
  return jnp.stack(leaves)
