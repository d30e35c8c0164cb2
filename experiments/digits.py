"""The embedded default: class-conditional 8x8 digits that scikit-learn ships; no download.

A DiT of width 64, depth 4, 4 heads, patch 2 (16 tokens, 0.3M parameters). The whole chain
(teacher, stage 1, stage 2, eval) runs on a 2-core laptop CPU in minutes.
Variants (the arg after the colon, comma-joined): 'tiny' shrinks every stage to a few steps,
for tests; 'unconditional' drops the labels (common.without_labels: mode dropping shows).
"""
from experiments.common import base_config
from experiments.common import variant_options
from experiments.common import without_labels


def get_config(arg=None):
  c = base_config()
  c.name = "digits"
  # The adversarial term's weight against DMD's. DMD's surrogate spreads its gradient over every
  # pixel (dL/dx = g / x.size) and the GAN loss only over the batch, so DMD2's ImageNet weight
  # (3e-3 at 64x64x3) is relatively about 200 times weaker on 8x8x1 digits: there it barely
  # moved the one-step result (FD-digits 9.7, twice the teacher's). Measured on seed 0, 400 steps
  # (benchmarks/README.md): 3e-2 -> 7.1, 0.3 -> 3.3, 0.9 -> 2.6, 3.0 -> 2.4.
  c.distribution.gen_adv_weight = 0.9
  options = variant_options(arg, "digits", ("tiny", "unconditional"))
  if "unconditional" in options:
    without_labels(c)
  if "tiny" in options:
    for stage in (c.teacher, c.trajectory, c.distribution):
      stage.num_steps, stage.batch_size = 4, 16
      stage.log_every, stage.checkpoint_every = 1, 2
    c.model.update(hidden_size=32, depth=2, num_heads=2, feature_layers=(0, 1))
    c.distribution.discriminator.hidden = 16
    c.sample.update(grid_size=20, teacher_steps=4)
    c.eval.update(num_samples=64, batch_size=32, teacher_steps=(4, 1), student_steps=(1,))
  return c
