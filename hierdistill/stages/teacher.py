"""Stage 0: train the multi-step teacher v(z, t | y) by flow matching (or import one).

Loss: || v_theta(z_t, t | y) - (e - x) ||^2, t ~ logit-normal, labels dropped to the null class
with probability model.class_dropout_prob so that classifier-free guidance works.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hierdistill import losses, paths, sampling
from hierdistill.stages import common


class TeacherStage:
  """Builds the teacher's train state and its train step."""

  name = "teacher"
  stage_id = 0  # salts the stage\'s rng and data order
  frozen_inputs = ()  # nothing frozen: the teacher trains alone

  def __init__(self, config, model):
    self.config = config
    self.cfg = config.teacher
    self.model = model
    self.optimizer = common.make_optimizer(self.cfg.optimizer)

  def init(self, rng, example_x, example_y, frozen=None):
    del frozen
    k_params, k_train = jax.random.split(rng)
    b = example_x.shape[0]
    params = self.model.init(k_params, example_x, None, jnp.ones((b,)), example_y)["params"]
    return common.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
        ema_params=params, rng=k_train)

  def train_step(self, state: common.TrainState, frozen, batch):
    del frozen
    x, y = batch["x"], batch["y"]
    key = common.step_key(state.rng, state.step)
    k_t, k_e, k_drop = jax.random.split(key, 3)
    t = paths.sample_t(k_t, x.shape[0], mu=self.cfg.t_mu, sigma=self.cfg.t_sigma)
    noise = jax.random.normal(k_e, x.shape, jnp.float32)

    def loss_fn(params):
      v_fn = lambda z, t_: common.apply_model(self.model, params, z, None, t_, y, train=True,
                                               rngs={"dropout": k_drop})
      loss, metrics = losses.flow_matching_loss(v_fn, x, noise, t)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return common.apply_gradients(self.optimizer, state, loss, grads, metrics,
                                  self.cfg.ema_decay)

  def sample(self, params, noise, y, *, num_steps=None):
    """Teacher samples with its configured ODE solver, step count and guidance."""
    s = self.config.sample
    return sampling.sample_teacher(
        common.velocity_fn(self.model, params), noise, y,
        num_steps=num_steps or s.teacher_steps, method=s.teacher_method,
        cfg_scale=s.cfg_scale, cfg_interval=s.get("cfg_interval"),
        guided_channels=s.get("guided_channels"),
        null_label=self.config.model.num_classes)
