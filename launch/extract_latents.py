"""Encodes ImageNet into SD-VAE latents once, before training:

  python launch/extract_latents.py --config=experiments/imagenet256.py \
      --config.data.manual_dir=/path/to/ILSVRC2012 --config.data.latents_dir=/path/to/latents \
      --config.vae.path=/path/to/sd-vae-ft-ema

Reads imagenet2012 through tfds (prepared from the manual download dir on first use), crops and
resizes each image to config.data.image_size as ADM does, encodes it (and its mirror image, with
config.data.flip) with the VAE on the devices of each process, and writes array_record shards of
the posterior and the label to config.data.latents_dir (hierdistill/encoding.py does the work;
hierdistill/data/imagenet_latents.py describes the format). Several processes (a pod, a SLURM
job) split the shards between them; rerunning skips finished shards.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config, e.g. experiments/imagenet256.py.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it reads at INFO
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  from hierdistill import encoding  # pylint: disable=g-import-not-at-top
  encoding.run_launcher(_CONFIG.value, encoding.extract_from_config)


if __name__ == "__main__":
  app.run(main)
