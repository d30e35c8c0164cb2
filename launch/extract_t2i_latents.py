"""Makes the text-to-image training shards once, before training (docs/t2i.md):

  python launch/extract_t2i_latents.py --config=experiments/mjhq_sana.py \
      --config.data.real_source=images --config.data.captions_file=pairs.jsonl \
      --config.data.images_dir=/path/to/images --config.data.latents_dir=/path/to/out \
      --config.vae.path=/path/to/dc-ae-f32c32-sana-1.0-diffusers \
      --config.text_encoder.path=/path/to/gemma-2-2b-it
  python launch/extract_t2i_latents.py --config=experiments/mjhq_sana.py \
      --config.data.real_source=teacher --config.data.prompts_file=prompts.txt \
      --config.teacher.init_checkpoint=/path/to/Sana_1600M_1024px_MultiLing.pth ...

real_source=images: each image of the JSONL ({"image": path under images_dir, "caption": text})
is centre-cropped to config.data.image_size and encoded by DC-AE; real_source=teacher: each
prompt is sampled by the teacher (config.data.teacher_steps steps of config.sample's solver, with
its CFG and shift). Either way the captions are encoded by Gemma-2 and everything is written as
array_record shards to config.data.latents_dir (hierdistill/data/text_latents.py). Several
processes split the shards; rerunning skips finished shards.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config, e.g. experiments/mjhq_sana.py.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  from hierdistill import encoding  # pylint: disable=g-import-not-at-top
  from hierdistill.sources import mjhq  # pylint: disable=g-import-not-at-top
  encoding.run_launcher(_CONFIG.value, mjhq.extract_from_config)


if __name__ == "__main__":
  app.run(main)
