"""Runs a hierdistill experiment: python launch/main.py --config=experiments/digits.py

Flags:
  --config=FILE[:ARG]    the experiment (get_config(ARG)); override any key with --config.a.b=V
  --workdir=DIR          where checkpoints, samples, logs and metrics go (default runs/<name>)
  --overwrite            if DIR holds a run of a different config, move it aside and start anew
  --heartbeat_timeout_s=100, --shutdown_timeout_s=300
                         several processes: how soon the others end after one dies or fails
Rerunning the same command resumes where the run stopped and skips finished stages.

Exit status: 0 done; 2 a mistake in the command, config, data or workdir (one line `error: ...`,
before anything compiles or is written); 1 the run could not go on (non-finite losses, no
checkpoint that restores; one line); 75 stopped by SIGTERM/SIGINT after saving (rerun to resume);
130 a second Ctrl-C (stopped at once). Anything else is a bug and shows its traceback. With
several processes every process stops at the same step with the same status; 134 (SIGABRT) on
the others when one process died or failed alone (docs/reliability.md).
"""
import difflib
import os
import re
import shlex
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
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "If the workdir holds a run of a different config, move that run aside "
    "(renamed, not deleted) and start anew. A run of the same config is always resumed.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "Several processes: seconds without a heartbeat after which a "
    "process counts as dead and the others are ended (status 134) rather than left waiting.")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout_s", 300, "Several processes: seconds a process that exits waits for the "
    "others to exit; past it all are ended (status 134).")
flags.mark_flags_as_required(["config"])

USAGE_ERROR = 2  # as config_checks.EXIT_CODE; not imported here, to keep flag errors fast
RUN_ERROR = 1


def _fail(message: str, code: int = USAGE_ERROR):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _config_arg(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _unknown_key_message(argv, error: Exception) -> str:
  """`--config.a.b=V: no such config key` plus the nearest real key, from ml_collections' text."""
  while isinstance(error, Exception) and error.args:  # AttributeError(KeyError(text))
    error = error.args[0]
  text = str(error)
  names = re.findall(r"'([^'\s]+)'", text)
  bad = names[0] if names else "?"
  flag = next((a.split("=", 1)[0] for a in argv
               if a.startswith("--config.") and f".{bad}." in a.split("=", 1)[0] + "."),
              f"--config...{bad}")
  hint = re.search(r'Did you mean "([^"]+)"', text)
  fix = (f"did you mean {flag.replace('.' + bad, '.' + hint.group(1), 1)}?" if hint else
         "check the spelling against the experiment file (experiments add no keys).")
  return f"{flag}: no such config key; {fix}"


def _parse_flags(argv):
  """absl's parser, with every mistake in the command turned into one line and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a config file that failed to load fails on first use: use it here
    return rest
  except flags.Error as e:
    text = str(e)
    if "--config must have a value" in text:
      _fail("--config is required: give an experiment file, e.g. "
            "--config=experiments/digits.py.")
    if "Error whilst parsing config file" in text:  # get_config raised: keep its last line
      last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
      _fail(f"--config={_config_arg(argv)}: {last}")
    if re.match(r"flag --config\.[\w.]+=", text):  # a value that does not parse as the key's type
      _fail(f"{text.split(': ', 1)[0][5:]}: {text.split(': ', 1)[-1]}; give a value of the type "
            "the experiment file sets for that key.")
    _fail(f"{text.splitlines()[0]}; see python launch/main.py --helpshort.")
  except (KeyError, AttributeError) as e:  # ml_collections on an override of an unknown key
    _fail(_unknown_key_message(argv, e))
  except OSError as e:  # the config file itself
    path = _config_arg(argv).split(":", 1)[0]
    reason = "no such file" if not os.path.exists(path) else str(e).splitlines()[-1].strip()
    near = difflib.get_close_matches(os.path.basename(path), _experiment_files(path), n=1)
    hint = f"did you mean {os.path.join(os.path.dirname(path), near[0])}?" if near else (
        "give the path of an experiment file, e.g. experiments/digits.py.")
    _fail(f"--config={path}: {reason}; {hint}")
  except TypeError as e:  # ml_collections' type-safety on an override
    _fail(f"{str(e).splitlines()[0]}; give a value of the type the experiment file sets for "
          "that key.")


def _experiment_files(path: str) -> list:
  folder = os.path.dirname(path) or "."
  try:
    return [f for f in os.listdir(folder) if f.endswith(".py")]
  except OSError:
    return []


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(_HEARTBEAT_TIMEOUT.value, _SHUTDOWN_TIMEOUT.value)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  from hierdistill import checkpoint  # pylint: disable=g-import-not-at-top
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  from hierdistill.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  from hierdistill.stages import loop  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:
    # orbax and tfds log every save and read at INFO; the console line is what users watch.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  try:
    pipeline.run(config, workdir, overwrite=_OVERWRITE.value)
  except loop.Preempted as e:
    print(f"{e}\n  resume: {shlex.join([sys.executable] + sys.argv)}", file=sys.stderr,
          flush=True)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
  except ConfigError as e:
    _fail(str(e))
  except (loop.NonFiniteError, checkpoint.CheckpointError) as e:
    _fail(str(e), RUN_ERROR)
  except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
    print(f"interrupted: steps since the last checkpoint are lost; rerun to resume:\n"
          f"  {shlex.join([sys.executable] + sys.argv)}", file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
