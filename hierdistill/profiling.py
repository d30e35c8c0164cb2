"""A profiler trace of chosen training steps: config.profile = (start_step, num_steps).

Steps start_step .. start_step + num_steps - 1 of every training stage that runs them (a stage's
own step count, as its log lines show) are traced with jax.profiler into
<workdir>/profile/<stage>: TensorBoard's profile plugin reads it (`tensorboard
--logdir=<workdir>/profile`, with tensorboard-plugin-profile installed), and the
perfetto_trace.json.gz beside it opens in ui.perfetto.dev. The first step of a stage compiles: start at 1 or later to see steady steps.
One process traces (process 0) unless config.profile_all_processes, then each process writes to
its own process_<i> folder. () = off, the default: nothing is imported or written.
"""
from __future__ import annotations

import os

import jax


def profile_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, "profile", stage)


class StepProfiler:
  """Starts the trace before the first chosen step and stops it after the last one's result."""

  def __init__(self, config, workdir: str, stage: str):
    profile = tuple(config.get("profile", ()) or ())
    self.first, self.end = (profile[0], profile[0] + profile[1]) if profile else (0, 0)
    everyone = bool(config.get("profile_all_processes", False))
    self.log_dir = profile_dir(workdir, stage)
    if everyone and jax.process_count() > 1:
      self.log_dir = os.path.join(self.log_dir, f"process_{jax.process_index()}")
    self.enabled = bool(profile) and (everyone or jax.process_index() == 0)
    self.active = False
    self.traced_from = None

  def before_step(self, step: int) -> None:
    """step: the 0-based index of the step about to run (a resumed run may start mid-range)."""
    if self.enabled and not self.active and self.first <= step < self.end:
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.active, self.traced_from = True, step

  def after_step(self, steps_done: int, result, last: bool = False) -> None:
    """Stops once the range is done (or the stage is), after the step's result exists: the
    trace then holds the whole of the last step's device work, not only its dispatch."""
    if self.active and (steps_done >= self.end or last):
      jax.block_until_ready(result)
      jax.profiler.stop_trace()
      self.active = False
      print(f"[profile] steps {self.traced_from}..{steps_done - 1} traced -> {self.log_dir}",
            flush=True)

  def close(self) -> None:
    """Stops a trace left open by a stage that ends early (preemption, an error)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
