"""The parts of every train step that are not a loss: EMA, guarded updates, optimiser."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hierdistill.stages import common


def test_ema_decay_warms_up_then_holds():
  steps = jnp.arange(10_000)
  decay = np.asarray(jax.vmap(lambda s: common.ema_decay_at(0.999, s))(steps))
  assert decay[0] == np.float32(0.1)  # (1 + 0) / (10 + 0)
  assert np.all(np.diff(decay) >= 0) and decay.max() == np.float32(0.999)
  # What remains of the initial params after n steps is the product of the decays: with the
  # warm-up it is negligible after 2,000 steps; a constant 0.999 would keep 13.5% of it.
  assert np.prod(decay[:2000].astype(np.float64)) < 1e-3
  assert 0.999 ** 2000 > 0.13


def test_apply_gradients_moves_ema_with_the_warmed_up_decay():
  @flax.struct.dataclass
  class State:  # the fields apply_gradients reads
    step: jax.Array
    params: dict
    opt_state: tuple
    ema_params: dict

  opt = optax.sgd(1.0)
  params = {"w": jnp.zeros(3)}
  state = State(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                ema_params=params)
  grads = {"w": -jnp.ones(3)}  # sgd(1.0): params become 1
  state, metrics = common.apply_gradients(opt, state, jnp.float32(1.0), grads, {}, 0.999)
  np.testing.assert_allclose(state.params["w"], 1.0)
  np.testing.assert_allclose(state.ema_params["w"], 0.9, rtol=1e-6)  # decay 0.1 at step 0
  assert int(state.step) == 1 and int(metrics["skipped"]) == 0
  # A non-finite gradient: params untouched, counted as skipped.
  state2, metrics2 = common.apply_gradients(opt, state, jnp.float32(jnp.nan), grads, {}, 0.999)
  np.testing.assert_array_equal(state2.params["w"], state.params["w"])
  assert int(metrics2["skipped"]) == 1
