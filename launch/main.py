"""Runs a hierdistill experiment: python launch/main.py --config=experiments/digits.py

Flags:
  --config=FILE[:ARG]    the experiment (get_config(ARG)); override any key with --config.a.b=V
  --workdir=DIR          where checkpoints, samples, logs and metrics go (default runs/<name>)
Rerunning the same command resumes where the run stopped and skips finished stages.
"""
import os
import sys

# Configs import `experiments.common`: make the repository root importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tfds/clu import TensorFlow; keep it quiet

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/digits.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.name>).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  from hierdistill.stages import loop  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:
    # orbax and tfds log every save and read at INFO; the console line is what users watch.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  try:
    pipeline.run(config, workdir)
  except loop.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
  except (ValueError, FileNotFoundError, PermissionError, loop.NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
