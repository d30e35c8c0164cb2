"""Checkpoints of each stage, the resume order, and the stage-to-stage handoff.

Layout: <workdir>/<stage>/checkpoints/<step>/{state, meta[, export]}
  state   the stage's whole train state (params, optimiser, EMA, rng, step)
  meta    JSON: the stage, its step, the data position, the config it ran with
  export  only in a stage's final checkpoint: the EMA parameters that the next stage starts from

Resume order (the one place it is written): a stage restores
  1. its own newest checkpoint that restores cleanly (a corrupt newer one is skipped with a
     warning, never deleted), else
  2. its init source: stage 1 from the teacher's export, stage 2 from stage 1's export (and the
     teacher for its fake network), else
  3. scratch (only the teacher stage may start from scratch).
Restores always target abstract arrays that carry the *current* mesh's shardings, so a run
saved on 8 devices resumes on 1, or on another mesh.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from hierdistill import sharding as shard_lib


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

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict, int]]:
    """(state, meta, step) from the newest checkpoint that restores, or None if none does.

    A checkpoint that fails to restore (truncated or deleted files) is reported and skipped,
    and left on disk for inspection: a good checkpoint is never deleted because a later one
    failed.
    """
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta), step
      except Exception as e:  # orbax raises many types for damaged files  # pylint: disable=broad-except
        logging.warning("%s: checkpoint at step %d does not restore (%s: %s); trying an older "
                        "one.", self.stage, step, type(e).__name__, str(e).splitlines()[0][:200])
    return None

  def restore_export(self, abstract_params: Any) -> Optional[Any]:
    """The exported (EMA) parameters of this stage's final checkpoint, or None."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          export=ocp.args.StandardRestore(abstract_params)))
    except (KeyError, ValueError, FileNotFoundError):
      return None
    return restored.export

  def read_meta(self, step: int) -> dict:
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def is_finished(workdir: str, stage: str, num_steps: int) -> bool:
  """A stage is finished when its checkpoint at its last step holds an export."""
  path = os.path.join(stage_dir(workdir, stage), "checkpoints", str(num_steps), "export")
  return os.path.isdir(path)


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


def abstract_like(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
