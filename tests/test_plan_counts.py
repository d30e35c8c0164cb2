"""The planner's FLOP counts, on CPU: XLA's cost analysis counts a loop it kept once and a loop
it unrolled whole, so the model's FLOPs are counted the same way before they scale the
compiler's estimates (planning.analysis.model_flops), from the loops the compiled program holds
(loop_trip_counts)."""
import types

import jax
import jax.numpy as jnp
import pytest

from hierdistill.planning import analysis

N = 16
MATMUL = 2.0 * N ** 3


def _program():
  """One matmul outside; a scan of 3 trips, each one matmul and an inner scan of 2 matmuls."""
  def fn(x, w):
    def inner(h, _):
      return h @ w, None

    def outer(h, _):
      h = h @ w
      return jax.lax.scan(inner, h, None, length=2)[0], None

    return jax.lax.scan(outer, x @ w, None, length=3)[0]
  args = (jax.ShapeDtypeStruct((N, N), jnp.float32), jax.ShapeDtypeStruct((N, N), jnp.float32))
  return types.SimpleNamespace(fn=fn, args=args)


@pytest.mark.parametrize("trip_counts, counted_matmuls", [
    (None, 1 + 1 + 1),  # unknown: every loop taken as kept, one trip each
    ((3, 2), 1 + 1 + 1),  # both kept
    ((2, 2, 2), 1 + 3 * (1 + 1)),  # the outer loop unrolled: its inner loop written 3 times
    ((), 1 + 3 * (1 + 2)),  # both unrolled: the compiler counts every matmul
    ((3,), 1 + 1 + 2),  # the inner loop unrolled inside the kept outer one
])
def test_model_flops_count_the_loops_as_the_compiled_program_holds_them(trip_counts,
                                                                        counted_matmuls):
  total, counted = analysis.model_flops(_program(), trip_counts)
  assert total == MATMUL * (1 + 3 * (1 + 2))
  assert counted == MATMUL * counted_matmuls


def test_trip_counts_are_read_from_the_compiled_loops():
  def fn(x, w):
    return jax.lax.fori_loop(0, 7, lambda i, h: jnp.tanh(h @ w), x)
  x = jnp.ones((N, N))
  text = jax.jit(fn).lower(x, x).compile().as_text()
  assert analysis.loop_trip_counts(text) == (7,)
