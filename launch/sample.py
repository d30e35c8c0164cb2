"""Draws samples from a trained generator: python launch/sample.py --from=runs/digits --num=64
--labels=3,7 --steps=1 --out=samples.png

Flags:
  --from=PATH       a run's workdir (its last finished stage, or --stage) or an exported generator
  --stage=NAME      with a workdir: 'distribution', 'trajectory' or 'teacher'
  --num=N           how many samples (labels and prompts are cycled to N)
  --labels=3,7      class labels (default: every class in turn)
  --prompt=TEXT     a text model's prompt (repeatable); --prompts_file=FILE: one a line
  --steps=N         sampling steps (default 1 for a student, the run's teacher_steps for a teacher)
  --times=1,0.75,0  a student's time grid from 1 down to 0 instead of the uniform one (here two
                    steps through t = 0.75); the steps are its length less one
  --cfg_scale=W     a teacher's guidance (default the run's)
  --seed=S          the seed of the noise: the same seed, flags and batch size give the same samples
  --out=FILE        .png (a grid) or .npz (samples, labels or prompts, seed); FILE.json records
                    the seed and everything asked
Exit status: 0 done; 2 a mistake in the command (one line `error: ...`).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

flags.DEFINE_string("from", None, "A run's workdir or an exported generator.")
flags.DEFINE_string("stage", None, "With a workdir: the stage to sample (default the last "
                    "finished).")
flags.DEFINE_integer("num", 64, "Number of samples.")
flags.DEFINE_list("labels", None, "Class labels, cycled to --num (default every class in turn).")
flags.DEFINE_multi_string("prompt", None, "A prompt of a text model; repeat for several.")
flags.DEFINE_string("prompts_file", None, "A file of prompts, one a line.")
flags.DEFINE_integer("steps", None, "Sampling steps (default 1 for a student).")
flags.DEFINE_list("times", None, "A student's time grid, from 1 down to 0 (e.g. 1,0.75,0: two "
                  "steps through t = 0.75); default the uniform grid of --steps.")
flags.DEFINE_float("cfg_scale", None, "A teacher's guidance scale (default the run's).")
flags.DEFINE_integer("seed", 0, "Seed of the noise.")
flags.DEFINE_integer("batch_size", 256, "Samples a program call (progress is shown per batch).")
flags.DEFINE_string("out", "samples.png", "Output file: .png or .npz.")
FLAGS = flags.FLAGS
USAGE_ERROR = 2


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def _asked(gen, num: int) -> list:
  """The labels or prompts of the samples, cycled to num."""
  prompts = list(FLAGS.prompt or [])
  if FLAGS.prompts_file:
    try:
      with open(FLAGS.prompts_file) as f:
        prompts += [line.strip() for line in f if line.strip()]
    except OSError as e:
      _fail(f"--prompts_file={FLAGS.prompts_file}: {e.strerror or e}; give a readable file of "
            "prompts, one a line.")
  if prompts and FLAGS.labels:
    _fail("give --labels or --prompt/--prompts_file, not both.")
  if prompts:
    # Each prompt fills a row: num // len(prompts) samples of each, in order.
    per = max(num // len(prompts), 1)
    return [p for p in prompts for _ in range(per)][:num] if num >= len(prompts) else prompts[:num]
  if gen.is_text:
    _fail("this generator reads text: give --prompt=... or --prompts_file=FILE.")
  if FLAGS.labels:
    try:
      labels = [int(v) for v in FLAGS.labels]
    except ValueError:
      _fail(f"--labels={','.join(FLAGS.labels)}: give integers, e.g. --labels=3,7.")
  else:
    labels = list(range(max(gen.conditions.num_classes, 1)))
  return [labels[i % len(labels)] for i in range(num)]


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  if not FLAGS["verbosity"].present:  # orbax logs every read at INFO
    logging.set_verbosity(logging.WARNING)
  source = FLAGS["from"].value
  if not source:
    _fail("--from is required: a run's workdir (e.g. --from=runs/digits) or an exported "
          "generator.")
  if FLAGS.num < 1 or FLAGS.batch_size < 1:
    _fail("--num and --batch_size must be >= 1.")
  out = FLAGS.out
  if not out.endswith((".png", ".npz")):
    _fail(f"--out={out}: give a .png or .npz file.")
  if os.path.dirname(out) and not os.path.isdir(os.path.dirname(out)):
    _fail(f"--out={out}: the directory {os.path.dirname(out)} does not exist.")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hierdistill import export  # pylint: disable=g-import-not-at-top
  from hierdistill import sampling  # pylint: disable=g-import-not-at-top
  from hierdistill.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  from hierdistill.generator import Generator  # pylint: disable=g-import-not-at-top
  from hierdistill.stages.loop import format_duration  # pylint: disable=g-import-not-at-top
  from hierdistill.workdir import check_writable  # pylint: disable=g-import-not-at-top

  try:
    # Before any sampling: an existing folder may still refuse the file (permissions, a
    # read-only mount, /proc), which PIL would only report after all the work.
    check_writable(os.path.dirname(out) or ".", what=f"--out={out}: the directory",
                   flag="--out")
  except ConfigError as e:
    _fail(str(e))
  times = None
  if FLAGS.times:
    try:
      times = sampling.check_times(FLAGS.times)
    except ValueError as e:
      _fail(f"--{e}")
  try:
    gen = Generator.load(source, FLAGS.stage)
    asked = _asked(gen, FLAGS.num)
    print(f"[sample] {gen.describe()}", flush=True)
    key = jax.random.PRNGKey(FLAGS.seed)
    t0, parts = time.time(), []
    for start in range(0, len(asked), FLAGS.batch_size):
      chunk = asked[start:start + FLAGS.batch_size]
      # Batch `start` draws from fold_in(seed, start): the seed fixes every sample.
      parts.append(gen(jax.random.fold_in(key, start), chunk, FLAGS.steps,
                       cfg_scale=FLAGS.cfg_scale, times=times))
      done = start + len(chunk)
      if len(asked) > FLAGS.batch_size:
        rate = done / (time.time() - t0)
        print(f"[sample] {done}/{len(asked)} | {rate:.1f} samples/s | ETA "
              f"{format_duration((len(asked) - done) / rate)}", flush=True)
  except (ConfigError, ValueError) as e:
    _fail(str(e).splitlines()[0])
  samples = np.concatenate(parts)
  steps = len(times) - 1 if times else FLAGS.steps
  record = {"from": os.path.abspath(source), "stage": gen.info.get("stage"),
            "role": gen.role, "seed": FLAGS.seed, "num": len(asked), "steps": steps or
            (1 if gen.role == "student" else gen.sample_config.get("teacher_steps")),
            "times": times, "cfg_scale": FLAGS.cfg_scale, "batch_size": FLAGS.batch_size,
            "asked": asked, "nfe": gen.nfe(steps, FLAGS.cfg_scale), "out": os.path.abspath(out),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
  try:  # the folder was writable a moment ago; a full disk still fails here, in one line
    export.save_samples(samples, out, gen, asked)
    with open(out + ".json", "w") as f:
      json.dump(record, f, indent=2, default=str)
  except OSError as e:
    _fail(f"--out={out}: {e.strerror or e}; choose a file you can write to.")
  print(f"[sample] {len(asked)} samples, seed {FLAGS.seed}, {record['nfe']} network pass(es) "
        f"each, in {format_duration(time.time() - t0)} -> {out} (and {out}.json)", flush=True)


if __name__ == "__main__":
  app.run(main)
