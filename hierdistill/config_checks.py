"""Checks of a run's config that must fail before anything compiles or is written.

Each error is one line naming the key, the problem and the fix.
"""
from __future__ import annotations

STAGE_ORDER = ("teacher", "trajectory", "distribution", "eval")
DISCRIMINATOR_POOLINGS = ("awd", "mean")
FEATURE_SOURCES = ("fake", "teacher")
INIT_SOURCES = ("trajectory", "teacher")


def validate_config(config) -> None:
  """Raises ValueError with a one-line message on the first problem found."""
  stages = tuple(config.stages)
  if not stages:
    raise ValueError("config.stages is empty; name at least one of " + ", ".join(STAGE_ORDER))
  for s in stages:
    if s not in STAGE_ORDER:
      raise ValueError(f"config.stages: unknown stage {s!r}; choose from {STAGE_ORDER}.")
  order = [STAGE_ORDER.index(s) for s in stages]
  if order != sorted(order) or len(set(order)) != len(order):
    raise ValueError(f"config.stages={stages} is not in the order {STAGE_ORDER} (each at most "
                     "once); a stage's input comes from the one before it.")
  for s in stages:
    if s == "eval":
      continue
    cfg = getattr(config, s)
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every"):
      if int(cfg[key]) < 1:
        raise ValueError(f"config.{s}.{key}={cfg[key]} must be a positive integer.")
  dist = config.distribution
  if dist.discriminator.pooling not in DISCRIMINATOR_POOLINGS:
    raise ValueError(f"config.distribution.discriminator.pooling={dist.discriminator.pooling!r}; "
                     f"choose from {DISCRIMINATOR_POOLINGS}.")
  if dist.discriminator.features not in FEATURE_SOURCES:
    raise ValueError(f"config.distribution.discriminator.features="
                     f"{dist.discriminator.features!r}; choose from {FEATURE_SOURCES}.")
  if dist.init_from not in INIT_SOURCES:
    raise ValueError(f"config.distribution.init_from={dist.init_from!r}; choose from "
                     f"{INIT_SOURCES}.")
  if int(dist.update_ratio) < 1:
    raise ValueError(f"config.distribution.update_ratio={dist.update_ratio} must be >= 1 "
                     "(critic updates per generator update).")
  m = config.model
  if m.name == "dit" and m.input_size % m.patch_size:
    raise ValueError(f"config.model.input_size={m.input_size} is not divisible by "
                     f"config.model.patch_size={m.patch_size}; pick a patch size that divides it.")
