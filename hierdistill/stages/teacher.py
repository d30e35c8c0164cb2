"""Stage 0: train the multi-step teacher v(z, t | c) by flow matching (or import one).

Loss: || v_theta(z_t, t | c) - (e - x) ||^2, t ~ logit-normal, conditions dropped to the null
condition (label K, or the empty prompt) with probability model.class_dropout_prob so that
classifier-free guidance works.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hierdistill import conditions as cond_lib
from hierdistill import losses, paths
from hierdistill.stages import common


class TeacherStage:
  """Builds the teacher's train state and its train step."""

  name = "teacher"
  stage_id = 0  # salts the stage\'s rng and data order
  frozen_inputs = ()  # nothing frozen: the teacher trains alone

  def __init__(self, config, model, conditions=None):
    self.config = config
    self.cfg = config.teacher
    self.model = model
    # conditions.Labels (the default) or conditions.Text: the null condition and its dropout.
    self.conditions = conditions or cond_lib.Labels(config.model.num_classes)
    self.optimizer = common.make_optimizer(self.cfg.optimizer)

  def init(self, rng, example_x, example_c, frozen=None):
    del frozen
    k_params, k_train = jax.random.split(rng)
    b = example_x.shape[0]
    params = self.model.init(k_params, example_x, None, jnp.ones((b,)), example_c)["params"]
    return common.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
        ema_params=params, rng=k_train)

  def train_step(self, state: common.TrainState, frozen, batch):
    del frozen
    x = batch["x"]
    key = common.step_key(state.rng, state.step)
    k_t, k_e, k_drop = jax.random.split(key, 3)
    t = paths.sample_t(k_t, x.shape[0], mu=self.cfg.t_mu, sigma=self.cfg.t_sigma)
    noise = jax.random.normal(k_e, x.shape, jnp.float32)
    # Captions are dropped here, labels inside the label embedder (train=True): conditions.py.
    c = self.conditions.drop(k_drop, batch["c"], float(self.config.model.class_dropout_prob))

    def loss_fn(params):
      v_fn = lambda z, t_: common.apply_model(self.model, params, z, None, t_, c, train=True,
                                               rngs={"dropout": k_drop})
      loss, metrics = losses.flow_matching_loss(v_fn, x, noise, t)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return common.apply_gradients(self.optimizer, state, loss, grads, metrics,
                                  self.cfg.ema_decay)

  def sample(self, params, noise, c, *, num_steps=None):
    """Teacher samples with its configured ODE solver, step count and guidance."""
    return common.sample_teacher(self.config, self.model, self.conditions, params, noise, c,
                                 num_steps=num_steps or self.config.sample.teacher_steps)
