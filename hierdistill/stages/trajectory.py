"""Stage 1: MeanFlow trajectory distillation of the teacher into a one-step "sketch".

The student u_theta(z, r, t | c) starts as a copy of the teacher (its interval embedding is new
and zero, so at step 0 u(z, r, t | c) == v_T(z, t | c)) and regresses the MeanFlow target built
from the teacher's guided velocity at z_t: u_tgt = sg(v_T - (t - r) du/dt).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hierdistill import conditions as cond_lib
from hierdistill import losses, paths, sampling
from hierdistill.models import init_student_from_teacher
from hierdistill.stages import common


class TrajectoryStage:
  """Builds the student's train state (from the teacher) and the MeanFlow train step."""

  name = "trajectory"
  stage_id = 1  # salts the stage\'s rng and data order
  frozen_inputs = ("teacher",)

  def __init__(self, config, student, teacher, conditions=None):
    self.config = config
    self.cfg = config.trajectory
    self.student = student
    self.teacher = teacher
    self.conditions = conditions or cond_lib.Labels(config.model.num_classes)
    # The JVP runs in float32 unless asked otherwise: bfloat16 tangents lose du/dt's small
    # terms, and MeanFlow runs reported NaNs that fp32 cured (PITFALLS.md).
    self.student_jvp = student.clone(dtype=common.dtype_of(self.cfg.jvp_dtype))
    self.optimizer = common.make_optimizer(self.cfg.optimizer)

  def init(self, rng, example_x, example_c, frozen):
    k_params, k_train = jax.random.split(rng)
    b = example_x.shape[0]
    t = jnp.ones((b,))
    fresh = self.student.init(k_params, example_x, t, t, example_c)["params"]
    params = init_student_from_teacher(fresh, frozen["teacher"])
    return common.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
        ema_params=params, rng=k_train)

  def teacher_velocity(self, teacher_params, z_t, t, c):
    """v_T = v_w(z_t, t | c): the teacher's guided velocity, a constant target."""
    return jax.lax.stop_gradient(paths.cfg_velocity(
        common.velocity_fn(self.teacher, teacher_params), z_t, t, c,
        w=self.cfg.cfg_scale, null=self.conditions.null_like(c),
        interval=self.cfg.get("cfg_interval")))

  def draw(self, key, x):
    """The step's random draws for the rows of x: (r, t) and the noise e."""
    k_rt, k_e = jax.random.split(key)
    r, t = paths.sample_r_t(k_rt, x.shape[0], mu=self.cfg.rt_mu, sigma=self.cfg.rt_sigma,
                            equal_fraction=self.cfg.equal_fraction)
    return {"r": r, "t": t, "noise": jax.random.normal(k_e, x.shape, jnp.float32)}

  def loss(self, params, teacher_params, x, c, key):
    """MeanFlow distillation loss of one batch; shared with stage 2's regulariser."""
    return self.loss_of_draws(params, teacher_params, x, c, self.draw(key, x))

  def loss_of_draws(self, params, teacher_params, x, c, draws):
    """The MeanFlow distillation loss of the rows x, c under the draws of `draw`."""
    r, t = draws["r"], draws["t"]
    z_t = losses.interpolate(x.astype(jnp.float32), draws["noise"], t)
    v_T = self.teacher_velocity(teacher_params, z_t, t, c)
    u_fn = lambda z, r_, t_: common.apply_model(self.student_jvp, params, z, r_, t_, c)
    u, u_tgt = losses.meanflow_target(u_fn, z_t, r, t, v_T)
    d = jnp.sum(jnp.square(u - u_tgt), axis=tuple(range(1, u.ndim)))
    loss = losses.adaptive_weighted_loss(d, p=self.cfg.adaptive_p, eps=self.cfg.adaptive_eps)
    per_element = d / (u.size // u.shape[0])
    metrics = {"meanflow_loss": loss, "meanflow_mse": jnp.mean(per_element),
               # The same error split by whether the sample asked for u (r < t) or v (r = t).
               "meanflow_mse_r_eq_t": jnp.sum(jnp.where(r == t, per_element, 0.0))
                                      / jnp.maximum(jnp.sum(r == t), 1),
               **common.time_bucket_means(per_element, t, "meanflow_mse")}
    return loss, metrics

  def train_step(self, state: common.TrainState, frozen, batch):
    key = common.step_key(state.rng, state.step)
    x = batch["x"]
    rows = {"x": x, "c": batch["c"], "draws": self.draw(key, x)}
    loss_fn = lambda params, r, i: self.loss_of_draws(params, frozen["teacher"], r["x"],
                                                      r["c"], r["draws"])
    (loss, metrics), grads = common.accumulate_gradients(
        loss_fn, state.params, rows, int(self.cfg.get("microbatches", 1)))
    return common.apply_gradients(self.optimizer, state, loss, grads, metrics,
                                  self.cfg.ema_decay, common.offloads(self.cfg))

  def sample(self, params, noise, c, *, num_steps=1):
    """One-step (or k-step) samples of the flow map: x = e - u(e, 0, 1 | c)."""
    u_fn = lambda z, r, t: common.apply_model(self.student, params, z, r, t, c)
    return sampling.flow_map_sample(u_fn, noise, num_steps=num_steps)
