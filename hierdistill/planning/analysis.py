"""Compile a program for a TPU slice and read what the TPU compiler says of it: memory per chip
(memory_analysis), FLOPs, bytes and its own step-time estimate (cost_analysis), the collectives
it wrote; and count the model's FLOPs from the program's own math.

Every figure here is the compiler's plan or estimate for a slice that was never run: memory is
what the compiled program allocates (exact for that program, short of the runtime's own
reserve); times and utilisations are estimates.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from typing import Optional

import jax
import jax.extend
import numpy as np

from hierdistill import sharding

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(\([^=]*\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


@dataclasses.dataclass
class Compiled:
  """What the TPU compiler planned for one program on one slice, per device."""
  seconds_to_compile: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  host_bytes: int  # host memory the program uses (memory kinds), if any
  compiler_flops: float  # per device, as the compiler counts them (remat included)
  bytes_accessed: float
  optimal_seconds: Optional[float]  # the compiler's own step-time estimate (None: not given)
  collective_bytes: dict  # kind -> bytes of the results, each op as written once
  # The trip count of each while loop the compiled program kept (0: not read): a loop the
  # compiler unrolled is counted whole by its cost analysis, a kept one once (model_flops).
  loop_trip_counts: tuple = ()

  @property
  def total_bytes(self) -> int:
    """The program's peak per device: inputs + outputs - donated aliases + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


class DoesNotFit(Exception):
  """The TPU compiler refused a program: it needs more HBM than the chip has. The message is
  the compiler's (what its temporaries need against the HBM available)."""

  def __init__(self, message: str, seconds_to_compile: float):
    super().__init__(message)
    self.message, self.seconds_to_compile = message, seconds_to_compile


def compile_program(program, mesh) -> Compiled:
  """What the compiler planned for a planning.programs.Program on `mesh`; DoesNotFit if the
  compiler found it too large for the chip's HBM."""
  step = jax.jit(program.fn, in_shardings=program.in_shardings,
                 out_shardings=program.out_shardings, donate_argnums=program.donate)
  t0 = time.time()
  try:
    # Traced under the mesh, as the training loop traces it (sharding.under_mesh).
    compiled = sharding.under_mesh(lambda: step.lower(*program.args).compile(), mesh)()
  except jax.errors.JaxRuntimeError as e:
    line = str(e).strip().splitlines()[0]
    if "RESOURCE_EXHAUSTED" in line and "HBM" in line:
      raise DoesNotFit(line.replace("RESOURCE_EXHAUSTED: ", ""), time.time() - t0) from None
    raise
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  optimal = cost.get("optimal_seconds")
  text = compiled.as_text()
  host = sum(int(getattr(mem, f"host_{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "output", "temp"))
  return Compiled(
      seconds_to_compile=seconds, argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
      temp_bytes=mem.temp_size_in_bytes, host_bytes=host,
      compiler_flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      optimal_seconds=float(optimal) if optimal is not None and optimal > 0 else None,
      collective_bytes=collective_bytes(text), loop_trip_counts=loop_trip_counts(text))


def collective_bytes(hlo_text: str) -> dict:
  """Bytes of the results of each kind of collective in an HLO module's text, each op counted
  once as written (an op inside a loop body is counted once, not per trip)."""
  out = {}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    sizes = [_DTYPE_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
             for dt, dims in shapes]
    if not sizes:
      continue
    # An async '-start' op's result is a tuple (operands, results): count its largest part.
    out[m.group(2)] = out.get(m.group(2), 0) + (max(sizes) if m.group(3) else sum(sizes))
  return out


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(", re.M)
_WHILE_CONDITION = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+)")
_BOUND = re.compile(r"= s32\[\]\S* constant\((\d+)\)")


def loop_trip_counts(hlo_text: str) -> tuple:
  """The trip count of each while loop in a compiled HLO module's text, in the order written:
  the constant its condition compares the counter against (scan's `i < length`); 0 where the
  condition holds no such constant."""
  starts = [(m.start(), m.group(1)) for m in _COMPUTATION.finditer(hlo_text)]
  bodies = {name: hlo_text[start:end] for (start, name), (end, _) in
            zip(starts, starts[1:] + [(len(hlo_text), "")])}
  counts = []
  for m in _WHILE_CONDITION.finditer(hlo_text):
    bound = _BOUND.findall(bodies.get(m.group(1), ""))
    counts.append(int(bound[0]) if len(bound) == 1 else 0)
  return tuple(counts)


@dataclasses.dataclass
class _Loop:
  """A scan of the program's jaxpr: its trip count, the FLOPs of one trip outside the loops
  nested in it, and those loops."""
  length: int
  flops: float
  inner: list


def model_flops(program, trip_counts=None) -> tuple:
  """(FLOPs, FLOPs counted as the compiled program's cost analysis counts them) of the
  program's matmuls and convolutions (dot_general, conv) as its jaxpr asks for them, for the
  whole global batch: the model's FLOPs, without the recomputation remat adds and without
  elementwise work (trace `program` from a config with remat off).

  XLA's cost analysis counts a while loop's body once, whatever its trip count (stage 2's k
  critic updates, the micro-batches, a sampler's steps), but the compiler may unroll a loop
  (stage 2's critic loop, when the optimiser states it carries live in host memory), and then
  counts every trip. `trip_counts` (Compiled.loop_trip_counts) says which loops the compiled
  program kept: the second figure counts those once and the unrolled ones whole, so the ratio
  of the two scales the compiler's estimates to the whole step. Without it every loop is taken
  as kept."""
  jaxpr = jax.make_jaxpr(program.fn)(*program.args)
  outside, loops = _flops_and_loops(jaxpr.jaxpr)
  unrolled = _unrolled_loops(loops, trip_counts)
  whole = outside + sum(_as_counted(loop, everything=True) for loop in loops)
  counted = outside + sum(_as_counted(loop, unrolled=unrolled) for loop in loops)
  return whole, counted


def _flops_and_loops(jaxpr) -> tuple:
  """(matmul and conv FLOPs outside any scan, [_Loop] of the scans at this level)."""
  total, loops = 0.0, []
  for eqn in jaxpr.eqns:
    prim = eqn.primitive.name
    if prim == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      (_, rc), (_, rb) = eqn.params["dimension_numbers"]
      free_rhs = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
      total += 2.0 * math.prod(lhs) * math.prod(free_rhs)
    elif prim == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2.0 * math.prod(out) * math.prod(rhs) / rhs[out_feature_dim]
    subs = [_flops_and_loops(s) for s in jax.extend.core.jaxprs_in_params(eqn.params)]
    if not subs:
      continue
    if prim == "scan":
      loops.append(_Loop(int(eqn.params["length"]), sum(f for f, _ in subs),
                         [loop for _, inner in subs for loop in inner]))
    elif prim == "cond":  # the costlier branch; its loops are not counted
      total += max(f + sum(_as_counted(l, everything=True) for l in inner) for f, inner in subs)
    else:
      total += sum(f for f, _ in subs)
      loops += [loop for _, inner in subs for loop in inner]
  return total, loops


def _as_counted(loop, *, everything=False, unrolled=frozenset()) -> float:
  """A loop's FLOPs: every trip (everything, or an unrolled loop), else one trip."""
  one_trip = loop.flops + sum(_as_counted(l, everything=everything, unrolled=unrolled)
                              for l in loop.inner)
  return one_trip * (loop.length if everything or id(loop) in unrolled else 1)


def _whiles_left(loop, unrolled) -> list:
  """The trip counts of the while loops a compiled program holds for `loop` and the loops in
  it, when the loops in `unrolled` are unrolled: an unrolled loop repeats its inner ones."""
  inner = [n for l in loop.inner for n in _whiles_left(l, unrolled)]
  return inner * loop.length if id(loop) in unrolled else [loop.length] + inner


def _unrolled_loops(loops, trip_counts) -> frozenset:
  """The ids of the loops the compiler unrolled: the fewest whose unrolling leaves exactly the
  while loops (by trip count) the compiled program holds. Loops of one trip are always
  unrolled; none else when the trip counts are unknown or nothing explains them."""
  every = []
  stack = list(loops)
  while stack:
    loop = stack.pop()
    every.append(loop)
    stack += loop.inner
  single = frozenset(id(l) for l in every if l.length <= 1)
  if trip_counts is None:
    return single
  lengths = {l.length for l in every}
  held = sorted(n for n in trip_counts if n in lengths and n > 1)
  candidates = [l for l in every if l.length > 1]
  if len(candidates) > 12:  # 2^12 hypotheses at most; a step has a handful of loops
    return single
  for size in range(len(candidates) + 1):
    for chosen in itertools.combinations(candidates, size):
      unrolled = single | {id(l) for l in chosen}
      if sorted(n for l in loops for n in _whiles_left(l, unrolled) if n > 1) == held:
        return unrolled
  return single
