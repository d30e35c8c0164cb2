"""Config blocks every experiment shares; an experiment file overrides what differs."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def optimizer(lr: float, *, warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.999,
              weight_decay: float = 0.0, grad_clip: float = 1.0) -> ml_collections.ConfigDict:
  """AdamW with linear warm-up and global-norm clipping (stages/common.py)."""
  return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, b1=b1, b2=b2,
                                        weight_decay=weight_decay, grad_clip=grad_clip))


def base_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with defaults; experiments change values, never add keys.

  microbatches (each stage): the step's batch_size rows are processed this many at a time and
  their gradients summed before the one update (gradient accumulation): memory for time, the
  same update (stages/common.accumulate_gradients).
  offload_optimizer_state (each stage): the stage's AdamW states live in the host's pinned
  memory between steps and come into HBM only for the update that reads them: HBM for
  host-to-device transfers, the same update (sharding.train_state_shardings).
  """
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0
  c.stages = ("teacher", "trajectory", "distribution", "eval")
  # Mesh ('data', 'fsdp'); -1 takes all devices the other axis leaves.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # (regex over parameter paths, 'fsdp' | 'replicate'); first match wins (sharding.py).
  c.sharding_rules = ((".*", "fsdp"),)
  # Steps whose loss or gradient is not finite are skipped (and counted); this many in a row
  # stop the run, its checkpoints kept (docs/reliability.md).
  c.max_consecutive_nonfinite = 20
  # (start_step, num_steps): a jax.profiler trace of those steps of every training stage, in
  # <workdir>/profile/<stage> (hierdistill/profiling.py); () = off. Process 0 only unless
  # profile_all_processes.
  c.profile = ()
  c.profile_all_processes = False
  # The frozen teacher of stages 1 and 2 (the target's and the real score's network) held in
  # this dtype: 'bfloat16' halves its memory; a bfloat16-compute model reads the same values
  # (its matmuls cast the weights to bfloat16 anyway), a float32 one reads rounded weights.
  # The students and the fake network start from the full-precision teacher either way.
  c.frozen_param_dtype = "float32"

  c.data = ml_collections.ConfigDict(dict(
      name="digits8x8",  # a data source of hierdistill/sources (e.g. 'digits8x8_text')
      # tfds data dir where embedded sets are built; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
      data_dir="",
      seed=0,  # toy sets only: the seed of their fixed training set
      unconditional=False))  # drop the labels: one class (toy 2-D mode-collapse studies)

  # The network: `name` ('dit' | 'mlp') and that module's fields (models/registry.py).
  # class_dropout_prob: condition dropout for CFG, labels or captions alike.
  # feature_layers: the blocks whose tokens the discriminator reads.
  # time_scale, interval_scale: the time and interval embedders read t and t - r in [0, 1], as
  # SiT does. DiT's 1000 t puts sinusoids of up to 1000 rad per unit t into the network, and
  # stage 1's target differentiates the network in t: on toy2d the teacher's dv/dt came out
  # about 10 x |v| and changed with the finite-difference step (high-frequency wiggles), the
  # MeanFlow error at t > 0.75 was 48 and the one-step sketch collapsed to the centre; at 1 it
  # is 0.003 and the sketch keeps all 8 modes (docs/method.md).
  c.model = ml_collections.ConfigDict(dict(
      name="dit", input_size=8, in_channels=1, patch_size=2,
      hidden_size=64, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10,
      class_dropout_prob=0.1, feature_layers=(1, 3), dtype="float32", param_dtype="float32",
      time_scale=1.0, interval_scale=1.0,
      # remat: recompute each block in the backward pass; remat_policy: what it keeps
      # (models/remat.py; jax.checkpoint_policies names). Memory and time only.
      remat=False, remat_policy="nothing_saveable",
      # scan_blocks: one block scanned depth times, params stacked (models/block_stack.py):
      # a program the compiler compiles in a fraction of the time; the same numbers.
      scan_blocks=False,
      # > 0: a text model reading caption tokens of this width by cross-attention
      # (experiments/digits_text.py); 0: class labels.
      caption_channels=0))

  # Stage 0: the teacher, trained by flow matching. init_checkpoint: a directory of exported
  # teacher params (e.g. <run>/teacher/checkpoints/<step>/export) to distil instead of training
  # one here; '' = this run's teacher stage.
  c.teacher = ml_collections.ConfigDict(dict(
      num_steps=2000, batch_size=64, microbatches=1, offload_optimizer_state=False,
      log_every=200, checkpoint_every=500, keep=2, ema_decay=0.999, t_mu=0.0, t_sigma=1.0,
      optimizer=optimizer(1e-3, warmup_steps=200),
      init_checkpoint=""))

  # Stage 1: MeanFlow trajectory distillation (METHOD.md).
  c.trajectory = ml_collections.ConfigDict(dict(
      num_steps=1000, batch_size=64, microbatches=1, offload_optimizer_state=False,
      log_every=100, checkpoint_every=500, keep=2, ema_decay=0.999,
      rt_mu=-0.4, rt_sigma=1.0,  # [MeanFlow] logit-normal(-0.4, 1.0) for (r, t)
      equal_fraction=0.75,  # [MeanFlow] share of samples with r = t
      adaptive_p=1.0, adaptive_eps=1e-3,  # [MeanFlow] adaptive loss weight
      cfg_scale=1.5, cfg_interval=config_dict.placeholder(tuple),  # teacher's guidance of v_T
      jvp_dtype="float32",
      optimizer=optimizer(3e-4, warmup_steps=100)))

  # Stage 2: DMD + adversarial term with the AWD (METHOD.md).
  c.distribution = ml_collections.ConfigDict(dict(
      num_steps=400, batch_size=64, microbatches=1, offload_optimizer_state=False,
      log_every=50, checkpoint_every=200, keep=2, ema_decay=0.99,
      init_from="trajectory",  # 'teacher' = DMD only (ablation: no stage 1)
      update_ratio=2,  # k critic updates per generator update ([DMD2]: 5 on ImageNet)
      dmd_weight=1.0,
      # [DMD2] ImageNet weights of G's and D's GAN terms. G's is relative to DMD's gradient,
      # which is spread over every pixel: small images need far more (experiments/digits.py).
      gen_adv_weight=3e-3, disc_weight=1e-2,
      regulariser_weight=0.0,  # weight of the stage-1 MeanFlow loss kept in stage 2
      # Share of generator rows drawn by a two-step path through t_mid (0: one step only, the
      # paper's stage 2): the flow map's own ('flow') or DMD2's re-noised one ('renoised');
      # see DistributionStage.generate. two_step_mid_spread > 0 draws each row's t_mid from
      # [mid - spread, mid + spread] (a schedule of the path) instead of fixing it.
      two_step_fraction=0.0, two_step_mid=0.5, two_step_mid_spread=0.0, two_step_path="flow",
      cfg_scale=1.5, cfg_interval=config_dict.placeholder(tuple),  # real score's guidance
      dmd_t_min=0.02, dmd_t_max=0.98,  # [DMD2] noise levels of the DMD gradient
      disc_t_min=0.02, disc_t_max=0.98,
      fake_t_mu=0.0, fake_t_sigma=1.0,  # fake network's flow-matching time density
      discriminator=ml_collections.ConfigDict(dict(
          pooling="awd",  # 'awd' (token weights) or 'mean' (standard head)
          features="fake",  # token features of 'fake' (DMD2) or the frozen 'teacher' (FastGen)
          hidden=64,
          tau=1.0)),  # softmax temperature of the AWD token weights
      optimizer=optimizer(1e-4, warmup_steps=0, b1=0.0, b2=0.99),
      fake_optimizer=optimizer(1e-4, warmup_steps=0, b1=0.0, b2=0.99),
      # A fresh head needs a faster rate than the pretrained networks: at 1e-4 the AWD
      # weights stayed uniform for 400 steps on digits (effective tokens 15.6 of 16); at 1e-3
      # they concentrate (about 11 of 16) and one-step FD-digits improved 8.6 -> 8.2.
      disc_optimizer=optimizer(1e-3, warmup_steps=0, b1=0.0, b2=0.99)))

  # Sample grids: the same noise and labels for every stage.
  c.sample = ml_collections.ConfigDict(dict(
      grid_size=100, teacher_steps=50, teacher_method="euler", cfg_scale=1.5,
      cfg_interval=config_dict.placeholder(tuple),
      # Guide only the first this many channels (DiT/SiT's samplers guide 3 of 4); None: all.
      guided_channels=config_dict.placeholder(int)))

  c.eval = ml_collections.ConfigDict(dict(
      num_samples=1000, batch_size=500,
      # Embedded image sets: score against this many training examples (a fixed subset;
      # evaluation/embedded.py); 0 = the whole training split.
      reference_size=0,
      teacher_steps=(50, 1, 2, 4), student_steps=(1, 2)))
  return c


def without_labels(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment with its labels dropped: one class, so a generator that drops a mode
  (a digit, a garment) is not held to it by its label, and per-class coverage shows it
  (evaluation/coverage.py). With one class there is no null condition to guide against, so the
  teacher trains without condition dropout and every guidance scale is 1."""
  c.data.unconditional = True
  c.model.update(num_classes=1, class_dropout_prob=0.0)
  c.trajectory.cfg_scale = c.distribution.cfg_scale = c.sample.cfg_scale = 1.0
  return c


def variant_options(arg, experiment: str, allowed) -> set:
  """The comma-joined variants of `--config=experiments/<experiment>.py:<arg>` as a set; an
  unknown one is a one-line error naming the choices."""
  options = set(arg.split(",")) if arg else set()
  if options - set(allowed):
    raise ValueError(f"experiments/{experiment}.py: unknown variant {arg!r}; use "
                     f"{', '.join(repr(a) for a in allowed)}, comma-joined, or nothing.")
  return options
