"""The training loop every stage runs: restore, compile once, step, log, checkpoint, stop cleanly.

A stage object supplies `name`, `conditions` (conditions.py: the kind of c its batches carry),
`init(rng, example_x, example_c, init_inputs)`, `train_step(state, frozen, batch)`,
`sample(params, noise, c)` and the config block
`config.<name>` (num_steps, batch_size, log_every, checkpoint_every). The loop owns the rest.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from hierdistill import agreement
from hierdistill import checkpoint as ckpt_lib
from hierdistill import profiling
from hierdistill import sharding as shard_lib
from hierdistill.evaluation import token_view
from hierdistill.stages import common

# Exit status of a run stopped by SIGTERM/SIGINT after saving: a scheduler may requeue it.
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL


class Preempted(Exception):
  """Raised after a stage saved its state because the process was asked to stop."""


class NonFiniteError(RuntimeError):
  """Raised when config.max_consecutive_nonfinite steps in a row had a non-finite loss or
  gradient (each was skipped: params and optimiser state unchanged)."""


class _StopFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (the step in flight ends)."""

  def __init__(self):
    self.signal: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint of this step
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class StageResult:
  """What a stage leaves behind: its final state and where its outputs are."""
  state: Any
  steps_run: int
  wall_time_s: float
  samples_path: Optional[str]
  final_metrics: dict


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _console_line(stage: str, step: int, total: int, metrics: dict, steps_per_s: float) -> str:
  keys = [k for k in ("loss", "grad_norm", "dmd_loss", "gen_adv_loss", "disc_loss",
                      "fake_flow_matching_mse", "meanflow_mse", "flow_matching_mse",
                      "awd_effective_tokens") if k in metrics]
  shown = " ".join(f"{k} {metrics[k]:.4g}" for k in keys)
  if metrics.get("skipped_total"):
    shown += f" skipped {int(metrics['skipped_total'])} (non-finite)"
  eta = (total - step) / steps_per_s if steps_per_s > 0 else float("nan")
  rate = f"{steps_per_s:.1f} steps/s" if math.isfinite(steps_per_s) else "compiling"
  return (f"[{stage}] step {step}/{total} | {shown} | {rate} | "
          f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")


def _count_skips(train_step):
  """train_step with exact skip counters carried beside the state, on the device.

  health: skipped (all steps), streak (consecutive skipped steps up to now), longest (the
  longest streak). Counting on the device keeps the loop free of a host sync per step; the
  loop reads the counters when it logs or saves. A step counts as skipped when its generator
  update or any of its critic updates was skipped.
  """

  def step(carry, frozen, batch):
    state, health = carry
    state, metrics = train_step(state, frozen, batch)
    bad = jnp.asarray(metrics.get("skipped", 0)) > 0
    if "critic_skipped" in metrics:
      bad = bad | (jnp.asarray(metrics["critic_skipped"]) > 0)
    bad = bad.astype(jnp.int32)
    streak = (health["streak"] + 1) * bad
    health = {"skipped": health["skipped"] + bad, "streak": streak,
              "longest": jnp.maximum(health["longest"], streak)}
    return (state, health), metrics

  return step


def _new_health(meta: Optional[dict] = None) -> dict:
  saved = (meta or {}).get("health", {})
  return {k: np.int32(saved.get(k, 0)) for k in ("skipped", "streak", "longest")}


def _write_token_view(stage, state, frozen, images, grid_c, *, config, mesh, workdir, step,
                      writer) -> None:
  """The discriminator's token weights over the grid's samples: a PNG beside the grid, the same
  picture and its numbers in TensorBoard (evaluation/token_view.py)."""
  path = os.path.join(ckpt_lib.stage_dir(workdir, stage.name), f"awd_weights_step{step}.png")
  picture, weights, means = token_view.write_token_weights(
      stage, state, frozen, images, grid_c, mesh=mesh, seed=config.seed,
      patch_size=stage.patch_size, path=path)
  writer.write_scalars(step, {f"{stage.name}/grid_awd_{k}": v for k, v in means.items()})
  if jax.process_index() == 0:
    writer.write_images(step, {f"{stage.name}/awd_weights": picture[None]})
    print(f"[{stage.name}] AWD token weights on the grid: "
          f"{token_view.describe(means, weights.shape[1])}; {path}", flush=True)


def run_stage(stage, *, config, workdir: str, mesh, pipeline, frozen: dict,
              init_inputs: Callable[[], dict], grid: tuple[np.ndarray, np.ndarray],
              writer, save_grid: Callable[[np.ndarray, str], None],
              progress=None) -> StageResult:
  """Trains one stage to config.<stage>.num_steps, resuming from its own checkpoints.

  frozen: pytrees the step reads but never changes (the teacher), already placed on the mesh.
  init_inputs: called only when the stage starts fresh; returns the handoff params.
  grid: fixed (noise, conditions) so every stage's samples can be compared picture to picture.
  progress: the chain's (stages/progress.ChainProgress), whose line follows the stage's ETA.
  """
  cfg = getattr(config, stage.name)
  rows = getattr(stage, "examples_per_row", 1)
  shard_lib.check_batch_size(cfg.batch_size, mesh, f"config.{stage.name}.batch_size")
  ckpts = ckpt_lib.StageCheckpoints(workdir, stage.name, max_to_keep=cfg.get("keep", 3))
  start_time = time.time()

  # Parameter shapes do not depend on the batch: one example is enough to initialise.
  example_x = jnp.zeros((1,) + pipeline.images.shape[1:], jnp.float32)
  example_c = jax.tree.map(jnp.asarray, stage.conditions.example(1))
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), stage.stage_id)

  def init_fn(rng, inputs):
    return stage.init(rng, example_x, example_c, inputs)

  inputs_abstract = None
  restored = None
  abstract_state = None
  # Shapes of the handoff params come from the frozen teacher or an eval_shape of the init
  # source; abstract evaluation allocates nothing.
  handoff = None
  if ckpts.latest_step() is not None:
    handoff_abstract = init_inputs(abstract=True)
    abstract_state = jax.eval_shape(init_fn, rng, handoff_abstract)
    shardings = shard_lib.train_state_shardings(
        abstract_state, mesh, config.sharding_rules,
        optimizer_state_on_host=common.offloads(cfg))
    restored = ckpts.restore_latest(shard_lib.with_shardings(abstract_state, shardings))
  if restored is not None:
    state, meta, start_step = restored
    health = _new_health(meta)
    logging.info("%s: resumed from step %d", stage.name, start_step)
    print(f"[{stage.name}] resumed from its checkpoint at step {start_step}", flush=True)
  else:
    health = _new_health()
    handoff = init_inputs(abstract=False)
    abstract_state = jax.eval_shape(init_fn, rng, handoff)
    shardings = shard_lib.train_state_shardings(
        abstract_state, mesh, config.sharding_rules,
        optimizer_state_on_host=common.offloads(cfg))
    state = jax.jit(init_fn, out_shardings=shardings)(rng, handoff)
    start_step = 0
  del handoff

  frozen_shardings = jax.tree.map(lambda a: a.sharding, frozen)
  health_shardings = jax.tree.map(lambda _: shard_lib.replicated(mesh), health)
  # Traced under the mesh (jax.set_mesh): the models pin their activations to the batch layout
  # only when they see it, and without the pins XLA gathers activations, not weights, under FSDP.
  step_fn = shard_lib.under_mesh(jax.jit(
      _count_skips(stage.train_step),
      in_shardings=((shardings, health_shardings), frozen_shardings,
                    shard_lib.batch_sharding(mesh)),
      out_shardings=((shardings, health_shardings), shard_lib.replicated(mesh)),
      donate_argnums=(0,)), mesh)
  health = jax.device_put(health, health_shardings)

  total = int(cfg.num_steps)
  log_every = int(cfg.log_every)
  ckpt_every = int(cfg.checkpoint_every)
  max_bad = int(config.get("max_consecutive_nonfinite", 20))
  scalars = {}
  t_last, s_last = time.time(), start_step
  meta = {"stage": stage.name, "config": config.to_json_best_effort()}

  def check_health(step) -> dict:
    """The skip counters as ints; NonFiniteError once a streak reached max_bad."""
    h = {k: int(v) for k, v in jax.device_get(health).items()}
    if h["longest"] >= max_bad:
      kept = ckpts.steps()
      ckpts.close()
      raise NonFiniteError(
          f"{stage.name}: {h['longest']} steps in a row had a non-finite loss or gradient "
          f"(config.max_consecutive_nonfinite={max_bad}; seen at step {step}, "
          f"{h['skipped']} skipped in all); the checkpoints in {ckpts.directory} are kept "
          f"(newest: step {kept[-1] if kept else 'none'}). Lower the learning rate or "
          "grad_clip, or check the data, then rerun to resume.")
    return h

  def save(step, final=False):
    h = check_health(step)  # a run that went bad stops before it saves
    ckpts.save(step, state, dict(meta, step=step, data_step=step, health=h),
               export=state.ema_params if final else None)

  # On a pod the signal may reach some processes only, or at other steps: they stop together.
  agree_stop = agreement.StopAgreement(stage.name, start_step)
  profiler = profiling.StepProfiler(config, workdir, stage.name)  # config.profile; off: no-op
  with _StopFlag() as stop:
    step = start_step
    while step < total:
      local = pipeline.batch(step)
      if rows > 1:  # (B * rows, ...) -> (B, rows, ...): each row is one minibatch of the step
        local = jax.tree.map(lambda a: a.reshape((a.shape[0] // rows, rows) + a.shape[1:]), local)
      profiler.before_step(step)
      (state, health), metrics = step_fn((state, health), frozen,
                                         shard_lib.put_batch(local, mesh))
      step += 1
      profiler.after_step(step, metrics, last=step == total)
      if step == start_step + 1:  # the first step compiles: keep it out of steps/s and ETA
        jax.block_until_ready(metrics)
        t_last, s_last = time.time(), step

      if step % log_every == 0 or step == total:
        metrics = jax.device_get(metrics)
        scalars = {k: float(np.mean(v)) for k, v in metrics.items()}
        h = check_health(step)
        scalars["skipped_total"] = h["skipped"]
        scalars["skipped_streak"] = h["streak"]
        now = time.time()
        rate = (step - s_last) / (now - t_last) if step > s_last else float("nan")
        t_last, s_last = now, step
        scalars["steps_per_s"] = rate
        writer.write_scalars(step, {f"{stage.name}/{k}": v for k, v in scalars.items()})
        if jax.process_index() == 0:
          line = _console_line(stage.name, step, total, scalars, rate)
          if progress is not None:
            line += " | " + progress.line(stage.name, step, total, rate)
          print(line, flush=True)

      if step == total:
        save(step, final=True)
      elif step % ckpt_every == 0:
        save(step)
      stop_by = agree_stop(step, stop.signal) if step < total else None
      if stop_by is not None:  # the same step on every process: all save it, all leave
        profiler.close()
        if step % ckpt_every:
          save(step)
        ckpts.close()
        whom = (f" (sent to process {', '.join(map(str, agree_stop.signalled))} of "
                f"{jax.process_count()})" if jax.process_count() > 1 else "")
        raise Preempted(
            f"{stage.name}: stopped by {signal.Signals(stop_by).name}{whom} after step {step}; "
            f"its checkpoint is saved under {ckpts.directory}. Rerun the same command to "
            "resume from there.")

  ckpts.close()
  wall = time.time() - start_time
  samples_path = None
  # Every process runs the sampler (it is one program over the mesh); process 0 writes.
  noise, grid_c = grid
  sample_fn = shard_lib.under_mesh(
      jax.jit(stage.sample, out_shardings=shard_lib.replicated(mesh)), mesh)
  images = np.asarray(jax.device_get(sample_fn(state.ema_params, jnp.asarray(noise),
                                               jax.tree.map(jnp.asarray, grid_c))))
  samples_path = os.path.join(ckpt_lib.stage_dir(workdir, stage.name), f"samples_step{total}.png")
  if jax.process_index() == 0:
    save_grid(images, samples_path)
    # TensorBoard shows the picture the source drew (decoded latents, captions, scatter plots),
    # not the raw samples: latents of 4 or 32 channels are no image.
    with Image.open(samples_path) as picture:
      drawn = np.asarray(picture.convert("RGB"))[None]
    writer.write_images(total, {f"{stage.name}/samples": drawn})
  if getattr(stage, "shows_token_weights", False):  # stage 2's AWD over a DiT: where it looks
    _write_token_view(stage, state, frozen, images, grid_c, config=config, mesh=mesh,
                      workdir=workdir, step=total, writer=writer)
  writer.flush()
  return StageResult(state=state, steps_run=total - start_step, wall_time_s=wall,
                     samples_path=samples_path, final_metrics=scalars)
