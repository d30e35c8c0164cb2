"""A 2-D mixture of Gaussians with an MLP: the quickest way to watch mode collapse and coverage.

Unconditional by default (data.unconditional: one class), so a generator that drops modes is
not rescued by labels; each stage leaves a scatter plot over the real data. The arg picks the
mixture: '8gaussians' (default) or '25gaussians'; 'tiny' shrinks every stage, for tests.
"""
import ml_collections

from experiments.common import base_config


def get_config(arg=None):
  c = base_config()
  modes = arg if arg in ("8gaussians", "25gaussians") else "8gaussians"
  c.name = f"toy2d_{modes}"
  c.data.update(name=modes, unconditional=True)
  c.model = ml_collections.ConfigDict(dict(
      name="mlp", width=256, depth=4, num_classes=1, class_dropout_prob=0.0,
      feature_layers=(1, 3), dtype="float32", param_dtype="float32",
      time_scale=1.0, interval_scale=1.0))  # t in [0, 1]: see experiments/common.py
  c.teacher.update(num_steps=3000, batch_size=256, log_every=500, checkpoint_every=1000)
  c.trajectory.update(num_steps=1500, batch_size=256, log_every=250, checkpoint_every=500,
                      cfg_scale=1.0)  # one class: nothing to guide
  c.distribution.update(num_steps=1000, batch_size=256, log_every=100, checkpoint_every=500,
                        cfg_scale=1.0)
  c.sample.update(grid_size=2000, cfg_scale=1.0)
  c.eval.update(num_samples=4000, batch_size=2000)
  if arg == "tiny":
    for stage in (c.teacher, c.trajectory, c.distribution):
      stage.update(num_steps=4, batch_size=16, log_every=2, checkpoint_every=2)
    c.model.update(width=32, depth=2, feature_layers=(0, 1))
    c.distribution.discriminator.hidden = 16
    c.sample.update(grid_size=64, teacher_steps=4)
    c.eval.update(num_samples=64, batch_size=32, teacher_steps=(4, 1), student_steps=(1,))
  elif arg not in (None, "8gaussians", "25gaussians"):
    raise ValueError(f"experiments/toy2d.py: unknown variant {arg!r}; use '8gaussians', "
                     "'25gaussians' or 'tiny'.")
  return c
