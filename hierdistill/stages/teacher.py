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
    # Condition dropout for CFG. A network with no label table (SANA) has no such field in its
    # config: its captions are dropped at the rate of SANA's own training, 0.1.
    self.dropout_rate = float(config.model.get("class_dropout_prob", 0.1))

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
    c = self.conditions.drop(k_drop, batch["c"], self.dropout_rate)
    microbatches = int(self.cfg.get("microbatches", 1))

    def loss_fn(params, rows, i):
      # The label embedder draws its dropout per call: each micro-batch its own key (the same
      # rate); every other draw above was made for the whole batch.
      k_labels = k_drop if microbatches == 1 else jax.random.fold_in(k_drop, i)
      v_fn = lambda z, t_: common.apply_model(self.model, params, z, None, t_, rows["c"],
                                               train=True, rngs={"dropout": k_labels})
      return losses.flow_matching_loss(v_fn, rows["x"], rows["noise"], rows["t"])

    (loss, metrics), grads = common.accumulate_gradients(
        loss_fn, state.params, {"x": x, "noise": noise, "t": t, "c": c}, microbatches)
    return common.apply_gradients(self.optimizer, state, loss, grads, metrics,
                                  self.cfg.ema_decay, common.offloads(self.cfg))

  def sample(self, params, noise, c, *, num_steps=None):
    """Teacher samples with its configured ODE solver, step count and guidance."""
    return common.sample_teacher(self.config, self.model, self.conditions, params, noise, c,
                                 num_steps=num_steps or self.config.sample.teacher_steps)
