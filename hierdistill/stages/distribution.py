"""Stage 2: distribution matching (DMD) plus the Adaptive Weighted Discriminator (AWD).

Networks: the generator G(e | c) = e - u_theta(e, 0, 1 | c), from stage 1's EMA weights; the fake
velocity network v_phi(z, t | c), from the teacher, trained online by flow matching on sg(G)
samples; a discriminator head over token features of v_phi (DMD2) or of the frozen teacher
(FastGen), config `discriminator.features`; the frozen teacher with CFG as the "real score".

One train step = k critic updates (v_phi and the head, two-time-scale as in DMD2) followed by one
generator update. The batch carries k + 1 real minibatches side by side: x is (B, k + 1, ...).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from hierdistill import conditions as cond_lib
from hierdistill import losses, paths
from hierdistill.models import token_weight_entropy
from hierdistill.stages import common
from hierdistill.stages.trajectory import TrajectoryStage

Array = jax.Array


@flax.struct.dataclass
class DistributionState:
  """The generator (params, as in every stage) plus the fake network and the discriminator."""
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Array
  fake_params: Any
  fake_opt_state: Any
  disc_params: Any
  disc_opt_state: Any


class DistributionStage:
  """Builds stage 2's state (generator, fake network, discriminator) and its train step."""

  name = "distribution"
  stage_id = 2  # salts the stage\'s rng and data order
  frozen_inputs = ("teacher",)

  def __init__(self, config, student, teacher, discriminator, conditions=None):
    self.config = config
    self.cfg = config.distribution
    self.student = student
    self.teacher = teacher
    self.conditions = conditions or cond_lib.Labels(config.model.num_classes)
    self.fake = teacher  # same architecture; its own parameters
    self.discriminator = discriminator
    self.k = int(self.cfg.update_ratio)
    # k critic minibatches and one generator minibatch of real data per step.
    self.examples_per_row = self.k + 1
    self.optimizer = common.make_optimizer(self.cfg.optimizer)
    self.fake_optimizer = common.make_optimizer(self.cfg.fake_optimizer)
    self.disc_optimizer = common.make_optimizer(self.cfg.disc_optimizer)
    self.adversarial = self.cfg.gen_adv_weight > 0 or self.cfg.disc_weight > 0
    # The optional stage-1 regulariser reuses stage 1's loss as it is.
    self.trajectory = TrajectoryStage(config, student, teacher, conditions)

  # -- networks -------------------------------------------------------------------------------
  def generate(self, params, noise, c, t_mid=None, renoise=None):
    """G(e | c) = e - u_theta(e, 0, 1 | c).

    With t_mid (B,), a row whose m = t_mid > 0 is drawn by a two-step path instead (m = 0
    leaves G's row as it is, so one-step and two-step rows share one program):
      the flow map's own (renoise None): z_m = e - (1 - m) u(e, m, 1), x = z_m - m u(z_m, 0, m);
      re-noised, DMD2's multi-step (renoise e', fresh noise): z_m = (1 - m) sg(G(e)) + m e',
      x = z_m - m u(z_m, 0, m), a gradient through the second jump only.
    """
    b = noise.shape[0]
    e = noise.astype(jnp.float32)
    if t_mid is None:
      u = common.apply_model(self.student, params, noise, jnp.zeros((b,)), jnp.ones((b,)), c)
      return e - u.astype(jnp.float32)
    m = t_mid.reshape((b,) + (1,) * (e.ndim - 1))
    if renoise is None:
      u_first = common.apply_model(self.student, params, noise, t_mid, jnp.ones((b,)), c)
      z_m = e - (1.0 - m) * u_first.astype(jnp.float32)
    else:
      g = self.generate(params, noise, c)
      z_m = jnp.where(m > 0, (1.0 - m) * jax.lax.stop_gradient(g) + m * renoise, g)
    u_second = common.apply_model(self.student, params, z_m, jnp.zeros((b,)), t_mid, c)
    return z_m - m * u_second.astype(jnp.float32)

  def two_step_draws(self, key, x) -> dict:
    """The draws of generate's two-step rows: t_mid (B,), config.two_step_mid for each row
    drawn with probability config.two_step_fraction, else 0 (one step), and for the re-noised
    path its fresh noise; {} when the lever is off. With config.two_step_mid_spread = s > 0 each
    two-step row's m is drawn uniformly from [mid - s, mid + s] instead: a schedule of the
    path, so that no single intermediate time is the only one trained. Stage 2 trains
    u(e, 0, 1) only, and the intervals two-step sampling reads drift with the shared weights
    (benchmarks/README, two_step.py): these rows put DMD and the adversarial term on a two-step
    path too, and the fake network and the head learn from both kinds of sample."""
    fraction = float(self.cfg.get("two_step_fraction", 0.0))
    if fraction <= 0:
      return {}
    # Keys of their own (fold_in, not one more split) keep every other draw as it was.
    picked = jax.random.uniform(jax.random.fold_in(key, 2), (x.shape[0],)) < fraction
    mid = jnp.float32(self.cfg.two_step_mid)
    spread = float(self.cfg.get("two_step_mid_spread", 0.0))
    if spread > 0:  # a key of its own again: the fixed-m draws stay as they were
      mid = mid + jax.random.uniform(jax.random.fold_in(key, 4), (x.shape[0],), jnp.float32,
                                     -spread, spread)
    draws = {"t_mid": jnp.where(picked, mid, jnp.float32(0.0))}
    if self.cfg.get("two_step_path", "flow") == "renoised":
      draws["renoise"] = jax.random.normal(jax.random.fold_in(key, 3), x.shape)
    return draws

  def discriminate(self, fake_params, teacher_params, disc_params, z, t, c):
    """(logits, token_weights) of the head over token features of the configured network."""
    feature_params = fake_params if self.cfg.discriminator.features == "fake" else teacher_params
    _, feats = common.apply_model(self.fake, feature_params, z, None, t, c, return_features=True)
    return self.discriminator.apply({"params": disc_params}, feats)

  # -- state ----------------------------------------------------------------------------------
  def init(self, rng, example_x, example_c, init_inputs):
    """init_inputs: 'generator' (stage-1 EMA params) and 'teacher' (fake network's start)."""
    k_disc, k_train = jax.random.split(rng)
    b = example_x.shape[0]
    params = init_inputs["generator"]
    fake_params = init_inputs["teacher"]
    _, feats = common.apply_model(self.fake, fake_params, example_x, None, jnp.ones((b,)),
                                  example_c, return_features=True)
    disc_params = self.discriminator.init(k_disc, feats)["params"]
    return DistributionState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
        ema_params=params, rng=k_train,
        fake_params=fake_params, fake_opt_state=self.fake_optimizer.init(fake_params),
        disc_params=disc_params, disc_opt_state=self.disc_optimizer.init(disc_params))

  # -- losses ---------------------------------------------------------------------------------
  # Each loss reads its random draws from a dict made for the whole batch beforehand (the
  # *_draws methods), so that gradient accumulation slices draws and data alike.
  def critic_draws(self, key, x):
    k_e, k_t, k_fm, k_td, k_dr, k_df = jax.random.split(key, 6)
    draws = {"e": jax.random.normal(k_e, x.shape),
             "t": paths.sample_t(k_t, x.shape[0], mu=self.cfg.fake_t_mu,
                                 sigma=self.cfg.fake_t_sigma),
             "fm_noise": jax.random.normal(k_fm, x.shape)}
    draws.update(self.two_step_draws(key, x))
    if self.adversarial:
      draws.update(t_d=self._disc_t(k_td, x.shape[0]),
                   real_noise=jax.random.normal(k_dr, x.shape),
                   fake_noise=jax.random.normal(k_df, x.shape))
    return draws

  def critic_loss(self, critic_params, gen_params, teacher_params, x, c, draws):
    """Flow matching of v_phi on sg(G) samples, plus the discriminator's loss on real vs G."""
    fake_params, disc_params = critic_params
    g = jax.lax.stop_gradient(
        self.generate(gen_params, draws["e"], c, draws.get("t_mid"), draws.get("renoise")))
    v_phi = lambda z, t_: common.apply_model(self.fake, fake_params, z, None, t_, c)
    fm_loss, metrics = losses.flow_matching_loss(v_phi, g, draws["fm_noise"], draws["t"])
    metrics = {"fake_" + k: v for k, v in metrics.items()}
    loss = fm_loss
    if self.adversarial:
      t_d = draws["t_d"]
      z_real = losses.interpolate(x, draws["real_noise"], t_d)
      z_fake = losses.interpolate(g, draws["fake_noise"], t_d)
      # One pass over real and fake rows, paired so each stays on its device (paths.pair_rows).
      logits, _ = self.discriminate(fake_params, teacher_params, disc_params,
                                    paths.pair_rows(z_real, z_fake), paths.pair_rows(t_d, t_d),
                                    jax.tree.map(paths.pair_rows, c, c))
      d_loss, d_metrics = losses.discriminator_loss(*paths.unpair_rows(logits))
      loss = loss + self.cfg.disc_weight * d_loss
      metrics.update(d_metrics)
    return loss, metrics

  def generator_draws(self, key, x):
    k_e, k_t, k_n, k_td, k_dn, k_reg = jax.random.split(key, 6)
    b = x.shape[0]
    draws = {"e": jax.random.normal(k_e, x.shape),
             "t": jax.random.uniform(k_t, (b,), minval=self.cfg.dmd_t_min,
                                     maxval=self.cfg.dmd_t_max),
             "noise": jax.random.normal(k_n, x.shape)}
    draws.update(self.two_step_draws(key, x))
    if self.adversarial:
      draws.update(t_d=self._disc_t(k_td, b), disc_noise=jax.random.normal(k_dn, x.shape))
    if self.cfg.regulariser_weight > 0:
      draws["regulariser"] = self.trajectory.draw(k_reg, x)
    return draws

  def generator_loss(self, params, critic_params, teacher_params, x, c, draws):
    """DMD + the AWD's non-saturating adversarial term + the optional MeanFlow regulariser."""
    fake_params, disc_params = critic_params
    b = x.shape[0]
    g = self.generate(params, draws["e"], c, draws.get("t_mid"), draws.get("renoise"))
    t = draws["t"]
    z_t = jax.lax.stop_gradient(losses.interpolate(g, draws["noise"], t))
    t_col = t.reshape((b,) + (1,) * (x.ndim - 1))
    # Denoised estimates x = z_t - t v: the teacher with CFG is the real score.
    v_real = paths.cfg_velocity(common.velocity_fn(self.teacher, teacher_params), z_t, t, c,
                                w=self.cfg.cfg_scale, null=self.conditions.null_like(c),
                                interval=self.cfg.get("cfg_interval"))
    v_fake = common.apply_model(self.fake, fake_params, z_t, None, t, c)
    x_real = z_t - t_col * v_real
    x_fake = z_t - t_col * v_fake.astype(jnp.float32)
    dmd, metrics = losses.dmd_loss(g, x_real, x_fake)
    loss = self.cfg.dmd_weight * dmd
    if self.adversarial:
      z_g = losses.interpolate(g, draws["disc_noise"], draws["t_d"])
      logits, weights = self.discriminate(fake_params, teacher_params, disc_params, z_g,
                                          draws["t_d"], c)
      adv, adv_metrics = losses.generator_adversarial_loss(logits)
      loss = loss + self.cfg.gen_adv_weight * adv
      entropy = token_weight_entropy(weights)
      metrics.update(adv_metrics, awd_weight_entropy=jnp.mean(entropy),
                     # exp(entropy): how many tokens the head effectively looks at.
                     awd_effective_tokens=jnp.mean(jnp.exp(entropy)),
                     awd_max_weight=jnp.mean(jnp.max(weights, axis=-1)))
    if self.cfg.regulariser_weight > 0:
      reg, reg_metrics = self.trajectory.loss_of_draws(params, teacher_params, x, c,
                                                       draws["regulariser"])
      loss = loss + self.cfg.regulariser_weight * reg
      metrics.update({"reg_" + k: v for k, v in reg_metrics.items()})
    return loss, metrics

  # -- where the AWD looks (a view, never part of training) ------------------------------------
  @property
  def shows_token_weights(self) -> bool:
    """Whether the head's token weights are worth a picture: a trained AWD over a token model
    (a DiT's patches; the toy MLP has one token, the mean-pooled head uniform weights)."""
    return (self.adversarial and self.cfg.discriminator.pooling == "awd"
            and hasattr(self.fake, "patch_size"))

  @property
  def patch_size(self) -> int:
    """Pixels (or latent cells) per side of the patch each token covers."""
    return int(self.fake.patch_size)

  def token_weights(self, state: DistributionState, frozen, samples, noise, c):
    """The AWD's token weights (N, T) for samples noised with `noise` to the middle of the GAN
    term's noise range: what the head weighs when it judges them. Deterministic; it reads the
    state and draws nothing from the training rng."""
    b = samples.shape[0]
    t = jnp.full((b,), 0.5 * (self.cfg.disc_t_min + self.cfg.disc_t_max), jnp.float32)
    z = losses.interpolate(samples.astype(jnp.float32), noise, t)
    _, weights = self.discriminate(state.fake_params, frozen["teacher"], state.disc_params,
                                   z, t, c)
    return weights

  def _disc_t(self, key, b):
    return jax.random.uniform(key, (b,), minval=self.cfg.disc_t_min, maxval=self.cfg.disc_t_max)

  # -- the step -------------------------------------------------------------------------------
  def train_step(self, state: DistributionState, frozen, batch):
    teacher_params = frozen["teacher"]
    x, c = batch["x"].astype(jnp.float32), batch["c"]
    key = common.step_key(state.rng, state.step)
    k_critic, k_gen = jax.random.split(key)

    microbatches = int(self.cfg.get("microbatches", 1))
    offload = common.offloads(self.cfg)

    def critic_update(carry, i):
      fake_params, fake_opt, disc_params, disc_opt = carry
      x_i, c_i = jnp.take(x, i, axis=1), cond_lib.take(c, i, axis=1)
      draws = self.critic_draws(jax.random.fold_in(k_critic, i), x_i)
      rows = {"x": x_i, "c": c_i, "draws": draws}
      loss_fn = lambda critic, r, _: self.critic_loss(critic, state.params, teacher_params,
                                                      r["x"], r["c"], r["draws"])
      (loss, metrics), (g_fake, g_disc) = common.accumulate_gradients(
          loss_fn, (fake_params, disc_params), rows, microbatches)
      finite = common.is_finite(loss, (g_fake, g_disc))
      fake_params, fake_opt = common.guarded_update(self.fake_optimizer, fake_params, fake_opt,
                                                    g_fake, finite, offload)
      disc_params, disc_opt = common.guarded_update(self.disc_optimizer, disc_params, disc_opt,
                                                    g_disc, finite, offload)
      metrics = dict(metrics, critic_loss=loss, fake_grad_norm=optax.global_norm(g_fake),
                     disc_grad_norm=optax.global_norm(g_disc),
                     critic_skipped=1 - finite.astype(jnp.int32))
      return (fake_params, fake_opt, disc_params, disc_opt), metrics

    carry = (state.fake_params, common.on_host(state.fake_opt_state, offload),
             state.disc_params, common.on_host(state.disc_opt_state, offload))
    carry, critic_metrics = jax.lax.scan(critic_update, carry, jnp.arange(self.k))
    fake_params, fake_opt, disc_params, disc_opt = carry
    critic_metrics = jax.tree.map(jnp.mean, critic_metrics)

    x_g, c_g = x[:, self.k], cond_lib.take(c, self.k, axis=1)
    rows = {"x": x_g, "c": c_g, "draws": self.generator_draws(k_gen, x_g)}
    loss_fn = lambda params, r, _: self.generator_loss(params, (fake_params, disc_params),
                                                       teacher_params, r["x"], r["c"],
                                                       r["draws"])
    (loss, metrics), grads = common.accumulate_gradients(loss_fn, state.params, rows,
                                                         microbatches)
    state = state.replace(fake_params=fake_params, fake_opt_state=fake_opt,
                          disc_params=disc_params, disc_opt_state=disc_opt)
    return common.apply_gradients(self.optimizer, state, loss, grads,
                                  dict(metrics, **critic_metrics), self.cfg.ema_decay, offload)

  def sample(self, params, noise, c, *, num_steps=1):
    return self.trajectory.sample(params, noise, c, num_steps=num_steps)
