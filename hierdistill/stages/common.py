"""What every stage's train step shares: its state, optimiser, EMA and guarded update."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from hierdistill import sampling

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """One network being trained: the teacher (stage 0) or the student (stage 1)."""
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Array  # a raw uint32[2] key; each step folds its step number in


def dtype_of(name: str):
  """'float32' | 'bfloat16' -> the jnp dtype; the config names dtypes as strings."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in dtypes:
    raise ValueError(f"unknown dtype {name!r}; choose from {sorted(dtypes)}.")
  return dtypes[name]


def frozen_copy(params, dtype_name: str):
  """A frozen network's params as the steps read them: floating leaves in config
  frozen_param_dtype ('float32': as stored, unchanged). Works on arrays and on abstract
  ShapeDtypeStructs alike (the planner's shapes)."""
  if dtype_name == "float32":
    return params
  dtype = dtype_of(dtype_name)

  def one(a):
    if not jnp.issubdtype(a.dtype, jnp.floating) or a.dtype == dtype:
      return a
    if isinstance(a, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
    return a.astype(dtype)

  return jax.tree.map(one, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with linear warm-up to a constant rate and global-norm gradient clipping.

  cfg: a stage's optimiser block (lr, warmup_steps, b1, b2, weight_decay, grad_clip).
  """
  schedule = optax.linear_schedule(0.0, cfg.lr, max(int(cfg.warmup_steps), 1))
  schedule = optax.join_schedules(
      [schedule, optax.constant_schedule(cfg.lr)], [max(int(cfg.warmup_steps), 1)])
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
  )


def ema_decay_at(decay: float, step: Array) -> Array:
  """The EMA decay used at `step` (0-based): min(decay, (1 + step) / (10 + step)).

  Why the warm-up: the EMA starts at the initial params, and a constant decay d keeps d^n of
  them after n steps: 0.999^2500 = 8% of a random initialisation still in a teacher's EMA after
  2,500 steps, enough to spoil its samples. The warm-up (TensorFlow's num_updates rule) lets
  the average follow the params early and reach `decay` after 9 / (1 - decay) - 1 steps
  (8,999 for 0.999).
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema_params, params)


def offloads(cfg) -> bool:
  """Whether a stage's optimiser state lives in host memory between steps (its config block's
  offload_optimizer_state): the state's shardings say where it lives
  (sharding.train_state_shardings), the step moves it (on_host, guarded_update)."""
  return bool(cfg.get("offload_optimizer_state", False))


def on_host(tree, offload: bool):
  """`tree` typed as host memory inside a step, when the optimiser state is offloaded
  (<stage>.offload_optimizer_state). A jitted step sees its arguments as device arrays whatever
  their memory kind, so an offloaded state is retyped as host memory first: then moving it into
  HBM for its update is a transfer the compiler schedules, and a scan may carry it on the host.
  A no-op when not offloaded."""
  return jax.device_put(tree, jax.memory.Space.Host) if offload else tree


def guarded_update(optimizer: optax.GradientTransformation, params, opt_state, grads,
                   finite: Array, offload: bool = False):
  """Applies the update only if `finite`; else keeps params and optimiser state as they were.

  A non-finite loss or gradient (a spike, a bad batch) must not poison Adam's moments: the
  step is skipped and counted instead (metrics 'skipped').

  offload: opt_state is host memory (on_host); it comes into HBM for this update only, and the
  new state goes back, so the rest of the step (the forward and backward passes) runs without it.
  """
  if offload:
    opt_state = jax.device_put(opt_state, jax.memory.Space.Device)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jnp.where(finite, new, old)
  new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
  return jax.tree.map(keep, new_params, params), on_host(new_opt_state, offload)


def apply_gradients(optimizer: optax.GradientTransformation, state, loss: Array, grads,
                    metrics: dict, ema_decay: float, offload: bool = False):
  """The end of every train step: guarded update of state.params, EMA (decay warmed up by
  ema_decay_at), step + 1, metrics.

  Returns (state, metrics) with metrics extended by loss, grad_norm and skipped (1 if the
  update was skipped for a non-finite loss or gradient). offload: state.opt_state lives in host
  memory (guarded_update).
  """
  finite = is_finite(loss, grads)
  params, opt_state = guarded_update(optimizer, state.params, on_host(state.opt_state, offload),
                                     grads, finite, offload)
  ema = ema_update(state.ema_params, params, ema_decay_at(ema_decay, state.step))
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                 skipped=1 - finite.astype(jnp.int32))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema), metrics


def accumulate_gradients(loss_fn: Callable, params, rows, microbatches: int):
  """((loss, metrics), grads) of loss_fn(params, rows) over all rows, `microbatches` slices of
  them at a time (gradient accumulation): the memory of one slice, the same update.

  loss_fn(params, rows, i) -> (loss, metrics): a mean over the rows it is given (i: the slice's
  index, 0 when there is one slice). rows: a pytree whose leaves all lead with the batch axis
  B: the data and every random draw of the step, drawn for the whole batch beforehand, so that
  each row meets the same noise however the batch is sliced. Slice i takes rows i, i + m,
  i + 2m, ... (m = microbatches): each device holds a contiguous block of the batch, so every
  slice is spread over all devices and no row moves. The loss, gradients and metrics are the
  means over slices: the whole batch's mean losses and gradients, to float rounding
  (per-bucket metrics become means of slice means).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, rows, 0)

  def slices(a):
    b = a.shape[0]
    return jnp.swapaxes(a.reshape((b // microbatches, microbatches) + a.shape[1:]), 0, 1)

  def add_slice(grad_sum, slice_i):
    i, rows_i = slice_i
    (loss, metrics), grads = grad_fn(params, rows_i, i)
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads)
    return grad_sum, (loss, metrics)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                       params)
  grad_sum, (losses, metrics) = jax.lax.scan(
      add_slice, zeros, (jnp.arange(microbatches), jax.tree.map(slices, rows)))
  grads = jax.tree.map(lambda s, p: (s / microbatches).astype(p.dtype), grad_sum, params)
  return (jnp.mean(losses), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)), grads


def is_finite(loss: Array, grads) -> Array:
  """True when the loss and the global gradient norm are finite."""
  return jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))


def step_key(rng: Array, step: Array) -> Array:
  """The key of one step: fold the step in, so a resumed run draws what it would have drawn."""
  return jax.random.fold_in(rng, step)


def time_bucket_means(values: Array, t: Array, name: str, num_buckets: int = 4) -> dict:
  """Means of a per-sample quantity in equal t buckets: which noise levels a loss struggles at.

  A bucket with no samples in the batch reports NaN-free 0 with its count 0 omitted.
  """
  edges = jnp.linspace(0.0, 1.0, num_buckets + 1)
  out = {}
  for i in range(num_buckets):
    lo, hi = edges[i], edges[i + 1]
    mask = (t >= lo) & ((t < hi) if i < num_buckets - 1 else (t <= hi))
    count = jnp.sum(mask)
    out[f"{name}/t{i / num_buckets:.2f}-{(i + 1) / num_buckets:.2f}"] = (
        jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1))
  return out


# Applying a network and sampling the teacher live with the samplers (sampling.py), which the
# generator and the evaluation import without training code; the stages use them by these names.
apply_model = sampling.apply_model
velocity_fn = sampling.velocity_fn
sample_teacher = sampling.sample_teacher_from_config
