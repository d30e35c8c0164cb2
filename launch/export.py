"""Exports a run's generator as one self-contained directory:
python launch/export.py --from=runs/digits --out=DIR

The directory (hierdistill/export.py lists its files) loads with
hierdistill.Generator.load(DIR), without the workdir or the training config: safetensors
weights (the published DiT/SiT key layout for a label DiT), config.json (network, conventions,
condition, VAE, sampler, checksums), the run's eval table, a sample grid and a model card.

Flags:
  --from=WORKDIR   the run
  --stage=NAME     the stage to export (default the last finished: distribution, trajectory,
                   teacher)
  --out=DIR        a new (or empty) directory
  --format=NAME    hierdistill (default: the directory above, any stage, any number of steps),
                   or the one-step student for another codebase (hierdistill/export_formats.py):
                   diffusers (a SanaPipeline folder, text students), sit / dit / lightningdit
                   (the official model code's checkpoint, class-conditional students)
  --num_steps=N    the steps the export must reproduce; the other formats hold one (default 1)
Exit status: 0 done; 2 a mistake in the command (one line `error: ...`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

flags.DEFINE_string("from", None, "The run's workdir.")
flags.DEFINE_string("stage", None, "The stage to export (default the last finished).")
flags.DEFINE_string("out", None, "The export directory (new or empty).")
flags.DEFINE_integer("grid_size", 64, "Samples in the export's grid.")
flags.DEFINE_enum("format", "hierdistill",
                  ["hierdistill", "diffusers", "sit", "dit", "lightningdit"],
                  "The export's format (hierdistill/export_formats.py).")
flags.DEFINE_integer("num_steps", 1, "Sampling steps the export must reproduce.")
FLAGS = flags.FLAGS


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  if not FLAGS["verbosity"].present:  # orbax logs every read at INFO
    logging.set_verbosity(logging.WARNING)
  if not FLAGS["from"].value or not FLAGS.out:
    _fail("--from=WORKDIR and --out=DIR are required, e.g. --from=runs/digits "
          "--out=exports/digits.")
  from hierdistill import generator  # pylint: disable=g-import-not-at-top
  from hierdistill.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    meta = generator.export_run(FLAGS["from"].value, FLAGS.out, FLAGS.stage,
                                grid_size=FLAGS.grid_size, fmt=FLAGS.format,
                                num_steps=FLAGS.num_steps)
  except ConfigError as e:
    _fail(str(e))
  except OSError as e:
    _fail(f"--out={FLAGS.out}: {e.strerror or e}; choose a directory you can write to.")
  print(f"[export] {meta['role']} of {FLAGS['from'].value} "
        f"({meta['source'].get('stage')} stage, format {FLAGS.format}) -> {FLAGS.out}: "
        f"{', '.join(sorted(os.listdir(FLAGS.out)))}", flush=True)


if __name__ == "__main__":
  app.run(main)
