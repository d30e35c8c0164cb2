"""A run's workdir between commands: it must be writable, and a rerun in it must be the same run.

The pipeline writes <workdir>/config.json. A later command in the same workdir resumes that run,
so its config is compared with the stored one first. Keys that change how a run is watched,
saved or placed, not what it computes, may differ (FREE_KEYS, and every stage's FREE_STAGE_KEYS).
So may every key of a stage that has not started here, nor has any stage after it: nothing in
the workdir was computed with it yet, so trying stage-2 settings on a finished stage 1 needs no
new workdir. A stage's num_steps may change (to train longer or stop earlier) unless that stage
already has a checkpoint beyond the new count, or a later stage has already started from its
result.
Keys that only one of the two configs has (a newer or older release) are not compared. Any other
difference refuses the run, unless --overwrite asks to move the old run aside (never deleted).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import jax

from hierdistill import checkpoint as ckpt_lib
from hierdistill.config_checks import TRAINING_STAGES, ConfigError

CONFIG_FILE = "config.json"
FREE_KEYS = ("name", "stages", "mesh", "sharding_rules", "max_consecutive_nonfinite",
             "data.data_dir", "model.remat", "model.remat_policy", "sample", "eval", "profile",
             "profile_all_processes")
# microbatches and offload_optimizer_state change memory and time, not the update, so a run may
# resume on a smaller slice with more micro-batches or its optimiser state on the host.
FREE_STAGE_KEYS = ("log_every", "checkpoint_every", "keep", "microbatches",
                   "offload_optimizer_state")
# Keys added after runs were stored, with the value those runs had: a run stored before
# model.scan_blocks existed holds its blocks unrolled, and resuming it scanned must be refused
# by name, not by a checkpoint that no longer fits.
ADDED_KEYS = {"model.scan_blocks": False}


def check_writable(workdir: str, *, what: str = "workdir", flag: str = "--workdir") -> None:
  """ConfigError unless workdir exists as a writable directory or can be created as one.

  Any directory a command will write to is checked this way before the work (the folder of
  launch/sample.py's --out, an export dir, a latents dir): `what` names it in the message,
  `flag` is the option to change.

  Tried, not inferred from permission bits: root ignores those, yet cannot write to an immutable
  directory (chattr +i), a read-only mount or a full disk. The probe is a temporary directory
  made and removed in workdir, or in its nearest existing ancestor when workdir does not exist
  yet; nothing is left behind.
  """
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ConfigError(f"{what} {workdir} cannot be created: {probe} is a file, not a "
                      f"directory; choose another {flag}.")
  try:
    with tempfile.TemporaryDirectory(prefix=".hierdistill-probe-", dir=probe):
      pass
  except OSError as e:
    reason = (e.strerror or type(e).__name__).lower()
    raise ConfigError(f"{what} {workdir} is not writable ({probe}: {reason}); choose a "
                      f"{flag} you can write to.") from None


def make_workdir(workdir: str) -> None:
  """Creates workdir; a failure (a race with the probe, a disk gone read-only) is one line."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} cannot be created ({(e.strerror or str(e)).lower()}); "
                      "choose a --workdir you can write to.") from None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _is_free(key: str) -> bool:
  if any(key == k or key.startswith(k + ".") for k in FREE_KEYS):
    return True
  block, _, name = key.partition(".")
  return block in TRAINING_STAGES and name in FREE_STAGE_KEYS


def _not_started(key: str, workdir: str) -> bool:
  """True if key belongs to a stage that, like every stage after it, has no checkpoint here.

  The stages after it count because they may have read its result or its settings (a teacher
  given by teacher.init_checkpoint has no checkpoint of its own, yet stage 1 learnt from it).
  """
  stage = key.split(".")[0]
  if stage not in TRAINING_STAGES:
    return False
  return not any(ckpt_lib.saved_steps(workdir, s)
                 for s in TRAINING_STAGES[TRAINING_STAGES.index(stage):])


def _num_steps_change(key: str, old, new, workdir: str) -> str | None:
  """Why changing <stage>.num_steps from old to new breaks the run in workdir; None if fine."""
  stage = key.split(".")[0]
  steps = ckpt_lib.saved_steps(workdir, stage)
  if steps and steps[-1] > new:
    return (f"config.{key}={new} but the {stage} stage in {workdir} already has a checkpoint at "
            f"step {steps[-1]}; give num_steps >= {steps[-1]}, another --workdir, or --overwrite "
            "to move the old run aside.")
  for later in TRAINING_STAGES[TRAINING_STAGES.index(stage) + 1:]:
    if ckpt_lib.saved_steps(workdir, later):
      return (f"config.{key} changed ({old} there, {new} here) but the {later} stage in "
              f"{workdir} already started from the {stage} stage's result; keep {key}={old}, "
              "use another --workdir, or pass --overwrite to move the old run aside.")
  return None


def check_previous_run(config, workdir: str, overwrite: bool = False) -> bool:
  """Compares config with the run stored in workdir; True if that run is to be moved aside.

  Raises ConfigError, naming the first differing key, when workdir holds a run of another
  config and overwrite is False. Writes nothing (see move_aside).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      stored = _flatten(json.load(f))
  except (OSError, ValueError) as e:
    if overwrite:
      return True
    raise ConfigError(f"{path} is unreadable ({type(e).__name__}); repair it, choose another "
                      "--workdir, or pass --overwrite to move the old run aside.") from None
  current = _flatten(json.loads(config.to_json_best_effort()))
  if any(k.startswith("model.") for k in stored):
    stored = {**ADDED_KEYS, **stored}
  differences = []
  for key in sorted(stored.keys() & current.keys()):
    old, new = stored[key], current[key]
    if old == new or _is_free(key) or _not_started(key, workdir):
      continue
    if key.endswith(".num_steps") and key.split(".")[0] in TRAINING_STAGES:
      problem = _num_steps_change(key, old, new, workdir)
      if problem is None:
        continue
      if not overwrite:
        raise ConfigError(problem)
    differences.append((key, old, new))
  if not differences:
    return False
  if overwrite:
    return True
  key, old, new = differences[0]
  more = f", and {len(differences) - 1} more" if len(differences) > 1 else ""
  raise ConfigError(f"workdir {workdir} holds a run of a different config ({key}: {old!r} "
                    f"there, {new!r} here{more}); rerun with that config, choose another "
                    "--workdir, or pass --overwrite to move the old run aside.")


def move_aside(workdir: str) -> str:
  """Renames workdir to <workdir>.replaced-<time> (kept, never deleted); returns the new path."""
  workdir = os.path.normpath(workdir)
  dest = f"{workdir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    os.rename(workdir, dest)
    print(f"--overwrite: moved the previous run in {workdir} to {dest}", flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("hierdistill_move_aside")
  return dest


def write_config(config, workdir: str) -> None:
  """Stores the config the run goes on with (process 0), for the next command to compare."""
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))  # a kill mid-write keeps the old one
