"""Checkpoints of each stage, the resume order, and the stage-to-stage handoff.

Layout: <workdir>/<stage>/checkpoints/<step>/{state, meta[, export]}
  state   the stage's whole train state (params, optimiser, EMA, rng, step)
  meta    JSON: the stage, its step, the data position, the config it ran with
  export  only in a stage's final checkpoint: the EMA parameters that the next stage starts from

Resume order (the one place it is written): a stage restores
  1. its own newest checkpoint that restores cleanly on every process (a corrupt newer one is
     skipped with a warning and moved to <workdir>/<stage>/corrupt_checkpoints/, never deleted;
     if none restores, the run stops with CheckpointError rather than start the stage over), else
  2. its init source: stage 1 from the teacher's export (or config.teacher.init_checkpoint, a
     directory of exported params), stage 2 from stage 1's export (and the teacher for its fake
     network), else
  3. scratch (only the teacher stage may start from scratch).
Restores always target abstract arrays that carry the *current* mesh's shardings, so a run
saved on 8 devices resumes on 1, or on another mesh. A save killed half-way leaves
<step>.orbax-checkpoint-tmp, which orbax neither lists nor restores, and replaces on the next save.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from hierdistill import agreement
from hierdistill import sharding as shard_lib
from hierdistill.config_checks import ConfigError


class CheckpointError(RuntimeError):
  """No checkpoint of a stage restores: the run stops rather than start that stage over."""


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


class StageCheckpoints:
  """The orbax CheckpointManager of one stage, with a restore that survives a corrupt latest."""

  def __init__(self, workdir: str, stage: str, *, max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.join(stage_dir(workdir, stage), "checkpoints")
    self.stage = stage
    self._manager = ocp.CheckpointManager(
        os.path.abspath(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        ),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict, export: Any = None) -> None:
    """Saves asynchronously; the previous save finishes first. `export`: final EMA params."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if export is not None:
      items["export"] = ocp.args.StandardSave(export)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of the checkpoint at `step`, placed as the abstract state's shardings say.

    Read by the item handlers, without the manager's closing barrier: in a multi-process run a
    process whose read failed would leave the others waiting in that barrier while it tried an
    older step. restore_latest has the processes agree on the outcome instead.
    """
    path = epath.Path(os.path.abspath(os.path.join(self.directory, str(step))))
    state = ocp.StandardCheckpointHandler().restore(
        path / "state", args=ocp.args.StandardRestore(abstract_state))
    return state, dict(ocp.JsonCheckpointHandler().restore(path / "meta"))

  def _restore_everywhere(self, step: int, what: str, restore: Callable[[], Any]) -> Any:
    """restore() on every process; it raises on every process if it failed on any, so all of
    them make the same choice (a file one process reads may be damaged, another's intact)."""
    try:
      result, error = restore(), None
    except Exception as e:  # many types for damaged files  # pylint: disable=broad-except
      result, error = None, e
    failed_on = agreement.failed_processes(error is not None,
                                           f"restore/{self.stage}/{what}/{step}")
    if error is not None:
      raise error
    if failed_on:
      raise CheckpointError(f"it does not restore on process {', '.join(map(str, failed_on))}")
    return result

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict, int]]:
    """(state, meta, step) from the newest checkpoint that restores; None if there is none.

    A checkpoint that fails to restore (truncated or deleted files) is reported with its step
    and skipped; once an older one restores, the failed ones are moved aside (a later save at
    their step would otherwise collide with them, and garbage collection could drop the good
    one in their favour). A good checkpoint is never deleted because a later one failed. If
    checkpoints exist but none restores, CheckpointError: starting over would throw a run away.
    In a multi-process run a checkpoint restores only if it does on every process, so all of
    them resume from the same step.
    """
    failures = []
    for step in reversed(self.steps()):
      try:
        state, meta = self._restore_everywhere(
            step, "state", lambda s=step: self.restore(s, abstract_state))
      # orbax raises many types for damaged files
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("%s: the checkpoint at step %d does not restore (%s); trying an older "
                        "one.", self.stage, step, _one_line(e))
        failures.append((step, e))
        continue
      for bad_step, _ in failures:
        self.quarantine(bad_step)
      return state, meta, step
    if failures:
      step, e = failures[0]
      raise CheckpointError(
          f"{self.stage}: no checkpoint under {self.directory} restores (the newest, step "
          f"{step}: {_one_line(e)}); fix or move that directory aside to start the stage over.")
    return None

  def quarantine(self, step: int) -> str:
    """Moves a damaged checkpoint out of the manager's sight, for inspection; returns where."""
    dest = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints", str(step))
    if os.path.exists(dest):
      dest += f".{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    _sync(f"quarantine_{self.stage}_{step}")
    self._manager.reload()
    logging.warning("%s: moved the damaged checkpoint of step %d to %s.", self.stage, step, dest)
    return dest

  def restore_export(self, abstract_params: Any) -> Optional[Any]:
    """The exported (EMA) parameters of this stage's final checkpoint, or None if it has none.

    Raises CheckpointError, after moving the checkpoint aside, if the export does not restore.
    """
    step = self.latest_step()
    if step is None or not os.path.isdir(os.path.join(self.directory, str(step), "export")):
      return None
    path = epath.Path(os.path.abspath(os.path.join(self.directory, str(step), "export")))
    try:
      export = self._restore_everywhere(step, "export", lambda: ocp.StandardCheckpointHandler(
          ).restore(path, args=ocp.args.StandardRestore(abstract_params)))
    except Exception as e:  # damaged files, as in restore_latest  # pylint: disable=broad-except
      where = self.quarantine(step)
      raise CheckpointError(
          f"{self.stage}: the final checkpoint at step {step} does not restore "
          f"({_one_line(e)}); moved it to {where}. Rerun to redo the stage from its newest good "
          "checkpoint.") from e
    return export

  def read_meta(self, step: int) -> dict:
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def is_finished(workdir: str, stage: str, num_steps: int) -> bool:
  """A stage is finished when its checkpoint at its last step holds an export."""
  return os.path.isdir(export_dir(workdir, stage, num_steps))


def export_dir(workdir: str, stage: str, num_steps: int) -> str:
  """Where a finished stage's EMA params are: a directory that load_params reads."""
  return os.path.join(stage_dir(workdir, stage), "checkpoints", str(num_steps), "export")


def saved_steps(workdir: str, stage: str) -> list[int]:
  """Steps of a stage's finished checkpoints, read from the directory names (no orbax)."""
  directory = os.path.join(stage_dir(workdir, stage), "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def load_export(workdir: str, stage: str, abstract_params: Any, shardings: Any) -> Any:
  """The final EMA params a finished stage handed on, placed with the current shardings."""
  ckpt = StageCheckpoints(workdir, stage, async_save=False)
  try:
    params = ckpt.restore_export(shard_lib.with_shardings(abstract_params, shardings))
  finally:
    ckpt.close()
  if params is None:
    raise FileNotFoundError(
        f"stage {stage!r} has no finished checkpoint under {ckpt.directory}; run that stage first "
        f"(add it to config.stages) or point to an existing workdir.")
  return params


def load_params(path: str, abstract_params: Any, shardings: Any) -> Any:
  """Params from a directory of exported params (a stage's export, or StandardCheckpointer's)."""
  target = shard_lib.with_shardings(abstract_params, shardings)
  # The handler, not a Checkpointer: a stage's export is an item directory, without the
  # step-level metadata a Checkpointer looks for (and warns about).
  return ocp.StandardCheckpointHandler().restore(
      epath.Path(os.path.abspath(path)), args=ocp.args.StandardRestore(target))


def check_params_fit(path: str, abstract_params: Any, *, what: str, fix: str) -> None:
  """ConfigError naming the first parameter whose presence or shape differs from the model's.

  Reads only the checkpoint's metadata: nothing is loaded, nothing compiles. `what` names the
  checkpoint in the message (e.g. 'config.teacher.init_checkpoint=DIR'), `fix` says what to do.
  """
  if not os.path.isdir(path):
    raise ConfigError(f"{what}: no such directory; point it to a directory of exported params, "
                      "e.g. <run>/teacher/checkpoints/<step>/export.")
  try:
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.abspath(path))).tree
  except Exception as e:  # pylint: disable=broad-except  # not a checkpoint, or a damaged one
    raise ConfigError(f"{what} is not a params checkpoint that orbax reads ({_one_line(e)}); "
                      "point it to a directory of exported params, e.g. "
                      "<run>/teacher/checkpoints/<step>/export.") from None
  saved = {shard_lib.path_str(p): tuple(leaf.shape)
           for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    name = shard_lib.path_str(p)
    if name not in saved:
      raise ConfigError(f"{what} does not fit the model: it lacks parameter {name!r}; {fix}")
    if saved[name] != tuple(leaf.shape):
      raise ConfigError(f"{what} does not fit the model: parameter {name!r} has shape "
                        f"{saved[name]} there but {tuple(leaf.shape)} here; {fix}")
  model = {shard_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      abstract_params)[0]}
  extra = sorted(set(saved) - model)
  if extra:
    raise ConfigError(f"{what} does not fit the model: it has parameter {extra[0]!r}, which the "
                      f"model lacks; {fix}")


def _one_line(e: BaseException) -> str:
  """The gist of an orbax/TensorStore error: its type and first line, without the spec dump."""
  text = str(e).strip().splitlines()
  first = text[0].split(" See full TensorStore details")[0][:200] if text else ""
  return f"{type(e).__name__}: {first}".rstrip(": ")


def _sync(name: str) -> None:
  """A barrier across processes (a no-op in one), so all see a directory moved by process 0."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def abstract_like(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
