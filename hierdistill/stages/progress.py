"""The whole chain's progress, shown beside each stage's console line: stage k of n, the time
since the chain started, and an estimate of when its training stages will be done.

The running stage's remaining time comes from its measured steps/s. A later stage has not run
yet, so its time is estimated from its step count and a step's cost relative to the running
stage's (STEP_COST); the estimate is marked '~' and corrects itself when that stage starts.
The eval stage is not in the estimate (its time depends on the sample count, not on steps).
"""
from __future__ import annotations

import math
import time

from hierdistill.config_checks import TRAINING_STAGES
from hierdistill.stages.loop import format_duration

# Seconds a step relative to the teacher's, measured on the digits default (README: about 15,
# 10 and 2 steps/s for the teacher, stage 1 and stage 2 with k = 2): stage 1 adds the guided
# teacher's passes and a JVP; stage 2 costs about 2.5 teacher steps per update, k critic
# updates plus the generator's.
STEP_COST = {"teacher": 1.0, "trajectory": 1.5}
DISTRIBUTION_COST_PER_UPDATE = 2.5


def step_cost(config, stage: str) -> float:
  if stage == "distribution":
    return DISTRIBUTION_COST_PER_UPDATE * (1 + int(config.distribution.update_ratio))
  return STEP_COST[stage]


class ChainProgress:
  """Made when the chain starts; `line` is called at every console report of a stage."""

  def __init__(self, config, start_time: float | None = None):
    self.stages = tuple(config.stages)
    self.start_time = time.time() if start_time is None else start_time
    self.steps = {s: int(getattr(config, s).num_steps) for s in self.stages
                  if s in TRAINING_STAGES}
    self.cost = {s: step_cost(config, s) for s in self.steps}

  def remaining_s(self, stage: str, step: int, total: int, steps_per_s: float) -> float:
    """Seconds until the last training stage ends (nan while the rate is unknown)."""
    if not (math.isfinite(steps_per_s) and steps_per_s > 0):
      return float("nan")
    seconds_per_cost = 1.0 / (steps_per_s * self.cost[stage])
    later = self.stages[self.stages.index(stage) + 1:]
    return ((total - step) / steps_per_s
            + sum(self.steps[s] * self.cost[s] * seconds_per_cost for s in later
                  if s in self.steps))

  def line(self, stage: str, step: int, total: int, steps_per_s: float,
           now: float | None = None) -> str:
    """'chain: stage 2 of 4, 3m05s elapsed, ETA ~4m10s'."""
    now = time.time() if now is None else now
    k = self.stages.index(stage) + 1
    eta = self.remaining_s(stage, step, total, steps_per_s)
    later = any(s in self.steps for s in self.stages[k:])
    shown = ("?" if not math.isfinite(eta) else
             ("~" if later else "") + format_duration(eta))
    return (f"chain: stage {k} of {len(self.stages)}, "
            f"{format_duration(now - self.start_time)} elapsed, ETA {shown}")
