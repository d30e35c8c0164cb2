"""Meshes, partition rules and batch placement: the same code from one CPU to a pod.

Mesh axes are ('data', 'fsdp'). Parameters and optimiser states are sharded over 'fsdp' by rules
(regexes over parameter paths, kept in the config); the batch is split over both axes. Shardings
are derived from `jax.eval_shape(init)`, so nothing is materialised before it is placed.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hierdistill.config_checks import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# A rule maps a regex over '/'-joined parameter paths to 'fsdp' (shard the largest axis that
# 'fsdp' divides) or 'replicate'. The first matching rule wins; unmatched leaves are replicated.
DEFAULT_RULES = ((".*", "fsdp"),)


def mesh_shape(data: int, fsdp: int, n: int) -> tuple:
  """(data, fsdp) of the mesh that config.mesh's data and fsdp give over n devices.

  -1 on one axis takes what the other leaves. With data=-1, fsdp is the most devices a weight
  is sharded over: a slice with fewer devices shards over all of them, a larger one repeats the
  fsdp groups along data (a hybrid mesh). So one config runs from one host to a pod, and its
  fsdp can be chosen to divide the model's widths, which a slice's device count (256) often
  does not.
  """
  if data == -1 and fsdp == -1:
    raise ConfigError("config.mesh: at most one of data and fsdp may be -1; set the other.")
  asked = (data, fsdp)
  if data == -1:
    fsdp = min(fsdp, n)
    if fsdp > 0 and n % fsdp:
      fits = max(d for d in range(1, fsdp + 1) if n % d == 0)
      raise ConfigError(f"config.mesh: fsdp={fsdp} does not divide the {n} devices here, so "
                        f"data=-1 cannot repeat it; give an fsdp that divides {n} (e.g. "
                        f"--config.mesh.fsdp={fits}).")
    data = n // fsdp if fsdp > 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data * fsdp != n:
    raise ConfigError(f"config.mesh: data={asked[0]} x fsdp={asked[1]} does not match the {n} "
                      f"devices here; make their product {n} (or set one of them to -1).")
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices, shaped by mesh_shape.

  The axes are AxisType.Auto: the step functions are written for the compiler to propagate
  shardings (jax.make_mesh defaults to Explicit axes in recent releases).
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(mesh_shape(data, fsdp, len(devices)), MESH_AXES,
                       axis_types=(AxisType.Auto,) * 2, devices=devices)


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


path_str = _path_str  # public: error messages name parameters the way the rules match them


_STACKED = re.compile(r"(^|/)blocks/")


def _action(path: str, rules) -> str:
  """The action of the first rule whose pattern matches `path` ('replicate' if none does)."""
  for pattern, action in rules:
    if re.fullmatch(pattern, path) or re.search(pattern, path):
      if action not in ("fsdp", "replicate"):
        raise ConfigError(f"config.sharding_rules: unknown action {action!r} for {pattern!r}; "
                          "use 'fsdp' or 'replicate'.")
      return action
  return "replicate"


# Small leaves (biases, norms) stay replicated: sharding them saves nothing and costs a gather.
_SMALLEST_SHARDED = 2 ** 12


def _leaf_layout(path: str, shape: Sequence[int], rules, fsdp_size: int) -> tuple:
  """(whether the rules ask to shard the leaf, its PartitionSpec): asked and replicated means
  fsdp_size divides none of its axes."""
  asked = _action(path, rules) == "fsdp" and int(np.prod(shape)) >= _SMALLEST_SHARDED
  if not asked or fsdp_size == 1:
    return asked, P()
  # The largest axis that the fsdp size divides.
  # A scanned stack's leaves (models/block_stack.py) lead with the block axis: sharding it
  # would put whole blocks on single chips, so it is never the one.
  first = 1 if _STACKED.search(path) else 0
  candidates = [(d, i) for i, d in enumerate(shape)
                if i >= first and d % fsdp_size == 0 and d >= fsdp_size]
  if not candidates:
    return True, P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return True, P(*spec)


def _leaf_spec(path: str, shape: Sequence[int], rules, fsdp_size: int) -> P:
  return _leaf_layout(path, shape, rules, fsdp_size)[1]


def _layouts(abstract_state, rules, fsdp_size: int):
  """The pytree's leaves, their layouts (_leaf_layout) in the same order, and its treedef."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  leaves = [leaf for _, leaf in with_paths]
  layouts = [_leaf_layout(_path_str(path), getattr(leaf, "shape", ()), rules, fsdp_size)
             for path, leaf in with_paths]
  return leaves, layouts, treedef


def _unshardable(leaves, layouts) -> float:
  asked = unshardable = 0
  for leaf, (is_asked, spec) in zip(leaves, layouts):
    if is_asked:
      size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
      asked += size
      unshardable += size if spec == P() else 0
  return unshardable / asked if asked else 0.0


def state_shardings(abstract_state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every leaf of an abstract (eval_shape) pytree, by the partition rules."""
  fsdp_size = mesh.shape["fsdp"]
  leaves, layouts, treedef = _layouts(abstract_state, rules, fsdp_size)
  # An fsdp size that divides none of a weight's axes leaves it whole, and silently: every chip
  # then holds it and its optimiser states (SANA's widths on 256 chips: 98% of the bytes; the
  # ImageNet XL models': 22%).
  fraction = _unshardable(leaves, layouts) if fsdp_size > 1 else 0.0
  if fraction > 0.2:
    logging.warning(
        "config.mesh: fsdp=%d divides no axis of %.0f%% of the weights' bytes, so every device "
        "holds them whole; use an fsdp that divides the model's widths, with data taking the "
        "rest (e.g. --config.mesh.data=-1 --config.mesh.fsdp=64).", fsdp_size, 100 * fraction)
  return treedef.unflatten([NamedSharding(mesh, spec) for _, spec in layouts])


def unshardable_fraction(abstract_state, fsdp_size: int, rules=DEFAULT_RULES) -> float:
  """Of the bytes the rules ask to shard (leaves of at least _SMALLEST_SHARDED elements), the
  fraction that stays whole on every device because fsdp_size divides none of its axes."""
  leaves, layouts, _ = _layouts(abstract_state, rules, fsdp_size)
  return _unshardable(leaves, layouts)


# The memory kind of the host's pinned memory: what the TPU (and GPU and CPU) runtimes move to
# and from HBM by DMA. The optimiser state can live there between steps
# (<stage>.offload_optimizer_state).
HOST_MEMORY = "pinned_host"


def train_state_shardings(abstract_state, mesh: Mesh, rules=DEFAULT_RULES, *,
                          optimizer_state_on_host: bool = False):
  """A stage's state's shardings (state_shardings), with every optimiser state (the fields
  named *opt_state) in host memory when `optimizer_state_on_host`: HBM then holds it only
  during the update that reads it (stages/common.guarded_update)."""
  shardings = state_shardings(abstract_state, mesh, rules)
  if not optimizer_state_on_host:
    return shardings
  on_host = lambda tree: jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), tree)
  return shardings.replace(**{k: on_host(v) for k, v in vars(shardings).items()
                              if k.endswith("opt_state")})


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh, key: str) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(f"{key}={batch_size} is not divisible by the {n} devices of the mesh; "
                      f"use a multiple of {n}.")


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh's device count that holds batch_size rows (an eval
  batch, padded rather than refused; the padding is trimmed by the caller)."""
  n = mesh.devices.size
  return -(-int(batch_size) // n) * n


def put_batch(local_batch, mesh: Mesh):
  """Global arrays from each process's slice of the batch (its rows of the leading axis)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def per_device_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a pytree laid out by `shardings` (the largest shard counts).

  What the partition rules buy, computed from shapes alone: the figure to set beside a
  compiler's memory analysis.
  """
  def one(leaf, sharding) -> int:
    shape = sharding.shard_shape(tuple(leaf.shape))
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize

  return sum(jax.tree.leaves(jax.tree.map(one, abstract, shardings)))


def constrain_batch(x, mesh: Mesh | None = None):
  """x with its leading (batch) axis over ('data', 'fsdp') and its other axes whole.

  Why: with parameters sharded over 'fsdp' and the batch over ('data', 'fsdp'), each matmul
  x W meets the 'fsdp' axis on both operands, and XLA's sharding propagation may resolve it by
  all-gathering the activations (the global batch on every device) instead of the weights; the
  DiT's dots do exactly that (benchmarks/README.md). Pinning activations to the batch layout
  makes the compiler gather weights: FSDP proper. mesh: default the mesh being traced under
  (jax.set_mesh, see `under_mesh`); with none, x is returned unchanged, so a model may call
  this unconditionally.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return x
  if x.ndim < 1 or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  if x.shape[0] % int(np.prod([mesh.shape[a] for a in BATCH_AXES])):
    return x  # e.g. the batch of 1 that init traces with: nothing to split
  spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


def batch_sharded_dot_general(mesh: Mesh | None = None):
  """A dot_general whose output keeps the batch layout (see constrain_batch): pass it as a
  Flax Dense's `dot_general` to keep that layer's activations batch-sharded under FSDP."""

  def dot_general(lhs, rhs, *args, **kwargs):
    return constrain_batch(jax.lax.dot_general(lhs, rhs, *args, **kwargs), mesh)

  return dot_general


def under_mesh(fn, mesh: Mesh):
  """fn, each call of it run with `mesh` as jax's context mesh (jax.set_mesh).

  A jitted function traces on its first call, so wrapping it makes the models' batch pins
  (constrain_batch) see the mesh; without it they are no-ops and XLA may gather activations
  under FSDP. Call it outside jit only (jax.set_mesh refuses to run under a trace).
  """

  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  return call


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs that carry shardings: the restore target orbax needs for a new mesh."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# How long the coordination service (process 0) waits for a process's heartbeat before it
# declares that process dead and ends every other one (status 134, SIGABRT): the bound on how
# long a pod hangs after one host is killed or lost. jax's default. Collectives that notice a
# closed connection themselves (gloo on CPU) end the others sooner.
HEARTBEAT_TIMEOUT_S = 100
# How long a process that exits waits for all the others to exit too (jax.distributed's shutdown
# barrier); past it, all of them are ended (status 134). Processes that stop together (done,
# preempted: status 75, or the same error everywhere) pass it at once; a process that failed
# alone ends the others within this bound instead of leaving them in a collective. jax's default.
SHUTDOWN_TIMEOUT_S = 300


def maybe_initialize_distributed(heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
                                 shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> None:
  """jax.distributed.initialize when launched as several processes (cluster env detected).

  On TPU pods and SLURM/GPU clusters jax finds the coordinator itself. Anywhere else (several
  processes on one machine, a cluster jax does not know) set JAX_COORDINATOR_ADDRESS=host:port,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID for each process; on CPU (JAX_PLATFORMS=cpu) the gloo
  collectives are selected, since the CPU backend has none across processes otherwise. A single
  process does nothing. Call before any other jax call. The timeouts: see HEARTBEAT_TIMEOUT_S
  and SHUTDOWN_TIMEOUT_S.
  """
  import os
  env = os.environ
  if not any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                "MEGASCALE_COORDINATOR_ADDRESS")):
    return
  if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
    if "JAX_PROCESS_ID" not in env:
      raise ConfigError("JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not; set it to this "
                        "process's index (0 to JAX_NUM_PROCESSES - 1).")
    initialize_distributed(
        env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]),
        cpu_collectives="gloo" if env.get("JAX_PLATFORMS", "") == "cpu" else None,
        heartbeat_timeout_s=heartbeat_timeout_s, shutdown_timeout_s=shutdown_timeout_s)
    return
  try:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s,
                               shutdown_timeout_seconds=shutdown_timeout_s)
  except RuntimeError as e:  # already initialised by the caller
    if "already" not in str(e):
      raise


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, *,
                           cpu_collectives: str | None = "gloo",
                           heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
                           shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> None:
  """jax.distributed.initialize with explicit coordinates: several processes on one machine
  (tests, laptops) or a cluster that sets no environment jax recognises.

  The CPU backend has no cross-process collectives unless one is named before it starts:
  'gloo' (TCP, built into jaxlib) or 'mpi'; None leaves the jax default. Call before any other
  jax call that touches devices. Each process then sees every device of the run in
  jax.devices() and its own in jax.local_devices().
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             shutdown_timeout_seconds=shutdown_timeout_s)
