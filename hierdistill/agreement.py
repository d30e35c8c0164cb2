"""Decisions the processes of a multi-process run take together: when to stop, what restores.

On a pod a preemption signal reaches the hosts at different moments, or only some of them. A
process that decided alone could save step N and leave while the others start step N + 1 and
wait in its collectives forever, or the processes could save (or restore) different steps. So
every such decision is exchanged between the processes and taken from what all of them said.

The exchange goes through JAX's distributed coordination service (the key-value store and the
barriers that jax.distributed.initialize starts on process 0), not through the devices: a barrier
on the hosts does not wait for the steps queued on the devices, so asking costs a few RPCs to the
coordinator and no pipeline drain. In one process nothing is exchanged and nothing is spent.

If a process dies, the coordination service stops hearing its heartbeats and ends every other
process within the heartbeat timeout (sharding.initialize_distributed), so a barrier here never
waits for a dead peer longer than that.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax

# Seconds between two stop checks (the check step is agreed, see StopAgreement), at least: a
# signal is acted on within about this long plus one step. A check costs a few ms of RPCs on an
# idle machine, tens of ms on an overloaded one (benchmarks/stop_agreement.py). The environment
# variable HIERDISTILL_STOP_CHECK_INTERVAL_S sets it (the same on every process).
STOP_CHECK_INTERVAL_S = float(os.environ.get("HIERDISTILL_STOP_CHECK_INTERVAL_S", 2.0))
# ... and at least this many times as long as a check took, so that checking never takes more
# than 1/200 = 0.5% of the wall time, however slow the coordinator answers.
CHECK_SPACING = 200
# A barrier here waits for the slowest process: one still compiling a stage's first step, or
# writing a checkpoint. A dead process ends the run sooner (heartbeats); past this the run is
# stuck for another reason and stops with the coordination service's DEADLINE_EXCEEDED.
BARRIER_TIMEOUT_S = 3600
_PREFIX = "hierdistill"
_decisions = 0  # failed_processes calls so far: the same count on every process


def _client():
  """The coordination service's client (jax.distributed; orbax reaches it the same way)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(f"{jax.process_count()} processes but no jax.distributed client: start "
                       "the run through sharding.maybe_initialize_distributed().")
  return client


def _exchange(name: str, value: Optional[str]) -> dict[int, str]:
  """{process: value} of every process that gave a value (None: gives none), after all
  processes reached the barrier `name` (unique per decision: a barrier id is used once)."""
  client = _client()
  key = f"{_PREFIX}/{name}"
  if value is not None:
    client.key_value_set(f"{key}/{jax.process_index()}", value)
  client.wait_at_barrier(key, BARRIER_TIMEOUT_S * 1000)
  return {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(key + "/")}


def failed_processes(failed: bool, name: str) -> list[int]:
  """The processes for which `failed` was True, the same list on every process.

  Every process must make the same calls in the same order (each is a barrier); `name` says
  what is decided, a count of the calls keeps each barrier's id unique. The few keys stay in
  the coordinator's store (a decision per restore, not per step).
  """
  global _decisions
  if jax.process_count() == 1:
    return [0] if failed else []
  _decisions += 1
  return sorted(_exchange(f"{name}/{_decisions}", "1" if failed else None))


class StopAgreement:
  """Whether to stop after a step: the same answer, at the same step, on every process.

  Call it after every step with the step number and this process's pending signal (None if it
  got none). It answers None, or the signal to stop by once any process got one. Processes
  exchange their signals only at check steps: the first step, then every STOP_CHECK_INTERVAL_S
  seconds or so (or CHECK_SPACING times the last check's duration, if longer). Process 0
  proposes the next check step from its measured steps/s (at least one step ahead) and every
  process takes it from the exchange, so the check steps, and hence the step a run stops at,
  are the same everywhere however the hosts' clocks and speeds differ.
  """

  def __init__(self, name: str, first_step: int, *, interval_s: Optional[float] = None,
               clock: Callable[[], float] = time.monotonic):
    self.name = name
    self.interval_s = STOP_CHECK_INTERVAL_S if interval_s is None else interval_s
    self.signalled: list[int] = []  # the processes that got the signal, once agreed
    self._clock = clock
    self._next = first_step + 1
    self._last = (first_step, clock())
    self._previous_key: Optional[str] = None
    self.check_s = 0.0  # how long the last check took (process 0)
    self.spacing_s = self.interval_s  # the time process 0 aims to leave until the next check

  def __call__(self, step: int, signum: Optional[int]) -> Optional[int]:
    if jax.process_count() == 1:
      self.signalled = [0] if signum is not None else []
      return signum
    if step < self._next:
      return None
    client = _client()
    key = f"{_PREFIX}/stop/{self.name}/{step}"
    start = self._clock()
    if jax.process_index() == 0:
      s0, t0 = self._last
      seconds_per_step = (start - t0) / max(step - s0, 1)
      self.spacing_s = max(self.interval_s, CHECK_SPACING * self.check_s)
      ahead = int(self.spacing_s / seconds_per_step) if seconds_per_step > 0 else 1
      client.key_value_set(f"{key}/next", str(step + max(ahead, 1)))
    if signum is not None:
      client.key_value_set(f"{key}/signal/{jax.process_index()}", str(int(signum)))
    client.wait_at_barrier(key, BARRIER_TIMEOUT_S * 1000)
    said = dict(client.key_value_dir_get(key + "/"))
    # Every process has read the previous check's keys before reaching this barrier.
    if jax.process_index() == 0 and self._previous_key:
      client.key_value_delete(self._previous_key)
    self._previous_key = key
    self._next = int(said[f"{key}/next"])
    self._last = (step, self._clock())
    self.check_s = self._last[1] - start
    signals = {int(k.rsplit("/", 1)[1]): int(v) for k, v in said.items() if "/signal/" in k}
    self.signalled = sorted(signals)
    return min(signals.values()) if signals else None
