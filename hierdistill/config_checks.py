"""Checks of a run's config that must fail before anything compiles or is written.

Each error is one line naming the key, the problem and the fix. Every mistake a user can make
(a config, a flag, a workdir, a checkpoint given as input) raises ConfigError; launch/main.py
prints it as `error: ...` and exits with EXIT_CODE. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re

STAGE_ORDER = ("teacher", "trajectory", "distribution", "eval")
TRAINING_STAGES = ("teacher", "trajectory", "distribution")
DISCRIMINATOR_POOLINGS = ("awd", "mean")
FEATURE_SOURCES = ("fake", "teacher")
INIT_SOURCES = ("trajectory", "teacher")
TWO_STEP_PATHS = ("flow", "renoised")  # distribution.two_step_path: DistributionStage.generate
# Storage dtypes of the frozen teacher (the real score) in stages 1 and 2.
FROZEN_DTYPES = ("float32", "bfloat16")
EXIT_CODE = 2  # the conventional exit status of a command-line usage error


class ConfigError(ValueError):
  """A mistake in what the user asked for; its message is one line: the problem and the fix."""


def _check_int(value, key: str, minimum: int = 1) -> None:
  # bool is an int to Python, but `num_steps=True` is a mistake, not 1.
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(f"config.{key}={value!r} is a {type(value).__name__}; give an integer.")
  if value < minimum:
    raise ConfigError(f"config.{key}={value} must be an integer >= {minimum}.")


def validate_config(config) -> None:
  """Raises ConfigError with a one-line message on the first problem found.

  Needs only the config: no devices, no data, no files (those are checked by the pipeline).
  """
  stages = tuple(config.stages)
  if not stages:
    raise ConfigError("config.stages is empty; name at least one of " + ", ".join(STAGE_ORDER))
  for s in stages:
    if s not in STAGE_ORDER:
      raise ConfigError(f"config.stages: unknown stage {s!r}; choose from {STAGE_ORDER}.")
  order = [STAGE_ORDER.index(s) for s in stages]
  if order != sorted(order) or len(set(order)) != len(order):
    raise ConfigError(f"config.stages={stages} is not in the order {STAGE_ORDER} (each at most "
                      "once); a stage's input comes from the one before it.")
  for s in TRAINING_STAGES:
    cfg = getattr(config, s)
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every"):
      _check_int(cfg[key], f"{s}.{key}")
    if cfg.get("keep") is not None:
      _check_int(cfg.keep, f"{s}.keep")
    _check_int(cfg.get("microbatches", 1), f"{s}.microbatches")
    if not isinstance(cfg.get("offload_optimizer_state", False), bool):
      raise ConfigError(f"config.{s}.offload_optimizer_state="
                        f"{cfg.offload_optimizer_state!r}; give True or False.")
    if cfg.batch_size % cfg.get("microbatches", 1):
      raise ConfigError(f"config.{s}.batch_size={cfg.batch_size} is not divisible by "
                        f"config.{s}.microbatches={cfg.microbatches}; use a divisor of the batch.")
  _check_int(config.get("max_consecutive_nonfinite", 20), "max_consecutive_nonfinite")
  if "text_encoder" in config:  # 0: every prompt of a call at once
    _check_int(config.text_encoder.get("batch_size", 0), "text_encoder.batch_size", minimum=0)
  profile = tuple(config.get("profile", ()) or ())
  if profile and (len(profile) != 2 or not all(isinstance(v, int) for v in profile)
                  or profile[0] < 0 or profile[1] < 1):
    raise ConfigError(f"config.profile={profile!r}: give (start_step, num_steps) with "
                      "start_step >= 0 and num_steps >= 1, e.g. --config.profile='(10, 5)', "
                      "or () for no trace.")
  frozen_dtype = config.get("frozen_param_dtype", "float32")
  if frozen_dtype not in FROZEN_DTYPES:
    raise ConfigError(f"config.frozen_param_dtype={frozen_dtype!r}; choose from {FROZEN_DTYPES}.")
  for rule in config.get("sharding_rules", ()):
    if len(rule) != 2 or rule[1] not in ("fsdp", "replicate"):
      raise ConfigError(f"config.sharding_rules: {tuple(rule)!r} is not (regex, 'fsdp' | "
                        "'replicate'); fix that rule.")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ConfigError(f"config.sharding_rules: {rule[0]!r} is not a regex ({e}); fix that "
                        "rule.") from None
  for key in ("num_samples", "batch_size"):
    _check_int(config.eval[key], f"eval.{key}")
  _check_int(config.eval.get("reference_size", 0), "eval.reference_size", minimum=0)

  init_checkpoint = config.teacher.get("init_checkpoint") or ""
  if not isinstance(init_checkpoint, str):
    raise ConfigError(f"config.teacher.init_checkpoint={init_checkpoint!r} must be a path "
                      "(a string), or '' to use this run's teacher stage.")
  if init_checkpoint and "teacher" in stages:
    raise ConfigError(f"config.teacher.init_checkpoint={init_checkpoint!r} imports a trained "
                      "teacher, yet config.stages also trains one; drop 'teacher' from "
                      "config.stages, or set --config.teacher.init_checkpoint=''.")

  from hierdistill import sources  # pylint: disable=g-import-not-at-top  (the names only)
  if config.data.name not in sources.NAMES:
    raise ConfigError(f"config.data.name={config.data.name!r}: no such data set; choose from "
                      f"{sources.NAMES}.")

  dist = config.distribution
  if dist.discriminator.pooling not in DISCRIMINATOR_POOLINGS:
    raise ConfigError(f"config.distribution.discriminator.pooling="
                      f"{dist.discriminator.pooling!r}; choose from {DISCRIMINATOR_POOLINGS}.")
  if dist.discriminator.features not in FEATURE_SOURCES:
    raise ConfigError(f"config.distribution.discriminator.features="
                      f"{dist.discriminator.features!r}; choose from {FEATURE_SOURCES}.")
  if dist.init_from not in INIT_SOURCES:
    raise ConfigError(f"config.distribution.init_from={dist.init_from!r}; choose from "
                      f"{INIT_SOURCES}.")
  _check_int(dist.update_ratio, "distribution.update_ratio")  # critic updates per G update
  fraction, mid = dist.get("two_step_fraction", 0.0), dist.get("two_step_mid", 0.5)
  is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if not is_number(fraction) or not 0 <= fraction <= 1:
    raise ConfigError(f"config.distribution.two_step_fraction={fraction!r}; give a number in "
                      "[0, 1]: the share of generator rows drawn by the two-step path.")
  if not is_number(mid) or not 0 < mid < 1:
    raise ConfigError(f"config.distribution.two_step_mid={mid!r}; give the two-step path's "
                      "intermediate time, a number strictly between 0 and 1.")
  spread = dist.get("two_step_mid_spread", 0.0)  # mid is a number in (0, 1) by now
  if not is_number(spread) or not 0 <= spread < min(mid, 1 - mid):
    raise ConfigError(f"config.distribution.two_step_mid_spread={spread!r}; give a number >= 0 "
                      f"and below min(two_step_mid, 1 - two_step_mid) = {min(mid, 1 - mid):g}, "
                      "so that every drawn intermediate time lies strictly between 0 and 1.")
  if dist.get("two_step_path", "flow") not in TWO_STEP_PATHS:
    raise ConfigError(f"config.distribution.two_step_path={dist.two_step_path!r}; choose from "
                      f"{TWO_STEP_PATHS}.")
  m = config.model
  if m.name == "dit" and m.input_size % m.patch_size:
    raise ConfigError(f"config.model.input_size={m.input_size} is not divisible by "
                      f"config.model.patch_size={m.patch_size}; pick a patch size that divides "
                      "it.")


def check_batch_sizes(config, num_devices: int, num_processes: int = 1) -> None:
  """Every training batch of the run must split evenly over the mesh and the processes.

  eval.batch_size need not: evaluation batches are padded to a multiple of the devices and the
  padding trimmed (evaluation/embedded.generate), so one config starts on 1, 2, 4 or 8 devices.
  """
  keys = [f"{s}.batch_size" for s in config.stages if s in TRAINING_STAGES]
  for key in keys:
    block, name = key.split(".")
    b = int(config[block][name])
    if b % num_devices:
      raise ConfigError(f"config.{key}={b} is not divisible by the {num_devices} devices of the "
                        f"mesh; use a multiple of {num_devices}.")
    m = int(config[block].get("microbatches", 1))
    if (b // m) % num_devices:  # each micro-batch is split over every device
      raise ConfigError(f"config.{block}.microbatches={m}: micro-batches of {b // m} do not "
                        f"split over the {num_devices} devices; make batch_size / microbatches "
                        f"a multiple of {num_devices}.")
    if b % num_processes:
      raise ConfigError(f"config.{key}={b} is not divisible by the {num_processes} processes; "
                        f"use a multiple of {num_processes}.")
