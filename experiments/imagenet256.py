"""ImageNet 256x256, class-conditional: distil the public SiT-XL/2 teacher into a one-step
generator on SD-VAE latents, and evaluate it as the papers do (docs/imagenet.md).

Before the first run: extract the latents once,
  python launch/extract_latents.py --config=experiments/imagenet256.py
then: python launch/main.py --config=experiments/imagenet256.py
Files the run needs (a missing one stops it before anything compiles, naming its key):
  data.latents_dir         the shards extract_latents writes (from data.data_dir/manual_dir)
  teacher.init_checkpoint  SiT-XL-2-256x256.pt (SiT repository README)
  vae.path                 stabilityai/sd-vae-ft-ema (diffusers folder)
  eval.inception_weights   pt_inception-2015-12-05-6726825d.pth (pytorch-fid release)
  eval.reference_batch     VIRTUAL_imagenet256_labeled.npz (ADM's guided-diffusion README)

Where each default comes from: [METHOD] ../shared/METHOD.md (the project's method page),
[SiT] Ma et al. 2024 and its repository, [DiT] Peebles & Xie 2023, [MeanFlow] Geng et al. 2025,
[DMD2] Yin et al. 2024, [ADM] Dhariwal & Nichol 2021's evaluation suite, [ours] our choice.

Variants (the arg after the colon; the teachers are compared in docs/imagenet.md):
  runlocal  the whole chain, evaluation included, on a CPU in minutes: mock ImageNet
            (tfds.testing.mock_data), a tiny VAE, DiT and Inception with random weights, a
            teacher trained for a few steps in place of SiT-XL/2. Its numbers mean nothing.
  repa      REPA's SiT-XL/2 (sihyun-yu/REPA, last.pt) as the teacher, with REPA's guidance:
            scale 1.8 for t <= 0.7 only, all four channels [REPA].
  dit       DiT-XL/2 (DiT-XL-2-256x256.pt), a DDPM noise predictor read through the DDPM
            adapter (models/ddpm.py), with DiT's guidance: 1.5 on 3 of 4 channels [DiT].
  lightningdit  LightningDiT-XL/1 (hustvl/LightningDiT, 800 epochs) on VA-VAE f16d32 latents
            (16x16x32, normalised per channel by its latents_stats.pt), with its sampler: 250
            grid points shifted by 0.3, cfg 6.7 for t <= 0.875 on 3 channels [LightningDiT].
"""
import ml_collections

from experiments.common import base_config, optimizer


def get_config(arg=None):
  c = base_config()
  c.name = "imagenet256"
  # The teacher is imported, not trained: the chain starts at stage 1.
  c.stages = ("trajectory", "distribution", "eval")
  # Every parameter and optimiser state sharded over all devices up to 64 (three XL networks
  # live at once in stage 2; PITFALLS.md), past 64 in groups of 64 along data (a hybrid mesh,
  # sharding.mesh_shape): 64 divides every XL width (1152, 3456, 4608, 6912), 256 not 1152 or
  # 3456. The batch is split over every device either way. [ours]
  c.mesh.update(data=-1, fsdp=64)

  c.data = ml_collections.ConfigDict(dict(
      name="imagenet256_latents",
      data_dir="",  # tfds dir of imagenet2012 ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
      manual_dir="",  # where ILSVRC2012_img_{train,val}.tar lie (tfds manual download)
      latents_dir="",  # array_record shards of launch/extract_latents.py
      seed=0, unconditional=False,
      image_size=256,  # ADM centre crop [ADM, DiT, SiT]
      flip=True,  # store and sample horizontally flipped latents [DiT/SiT: random flips]
      latent_sampling="sample",  # a fresh posterior draw each time, as DiT/SiT trained [DiT]
      num_shards=1024, extract_batch_size=256,  # extraction only [ours]
      mock_num_examples=0))  # > 0: mock ImageNet of that size (tests, runlocal)

  # SD-VAE ft-EMA, latents x 0.18215 [DiT, SiT]. Pinned: ft-MSE latents change FID (PITFALLS.md).
  c.vae = ml_collections.ConfigDict(dict(
      path="",  # a diffusers folder (config.json + diffusion_pytorch_model.safetensors)
      variant="ft-EMA",  # recorded with the latents and every metric
      scaling_factor=0.18215,
      random_init=False,  # tests and runlocal only: random weights, no file
      sizes=ml_collections.ConfigDict(dict(block_out_channels=(128, 256, 512, 512),
                                           layers_per_block=2, norm_num_groups=32)),
      batch_size=64))  # decoding batch of the evaluation [ours]

  # SiT-XL/2 [SiT]: DiT-XL/2's network on 32x32x4 latents, learn_sigma outputs (8 channels),
  # t' = 1 - t embedded in [0, 1] (time_scale 1, time_flip: convert/dit.py).
  c.model = ml_collections.ConfigDict(dict(
      name="dit", input_size=32, in_channels=4, patch_size=2,
      hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, num_classes=1000,
      class_dropout_prob=0.1, out_channels=8, time_scale=1.0, time_flip=True,
      prediction="velocity",  # SiT's velocity, negated on import ('ddpm_noise' for DiT)
      # The student's new interval embedder reads 1000 (t - r), DiT's time resolution [ours].
      interval_scale=1000.0,
      feature_layers=(13, 20, 27),  # blocks the discriminator reads [ours]
      dtype="bfloat16", param_dtype="float32",
      remat=True, remat_policy="nothing_saveable",  # three XL networks in stage 2 [ours]
      scan_blocks=False,  # models/block_stack.py [ours]
      attention="einsum"))  # JVP-safe (METHOD.md, PITFALLS.md)

  c.teacher.update(
      # SiT-XL-2-256x256.pt (a published .pt is imported by convert/dit.py; a directory of
      # exported params is restored as for any run).
      init_checkpoint="",
      checkpoint_kind="sit")  # 'sit', 'repa' or 'dit': how to read a published file (convert/dit.py)

  c.trajectory.update(
      num_steps=200_000, batch_size=256,  # [MeanFlow] batch 256; length [ours]
      log_every=100, checkpoint_every=5000, keep=3,
      ema_decay=0.9999,  # [MeanFlow]
      rt_mu=-0.4, rt_sigma=1.0, equal_fraction=0.75,  # [MeanFlow, METHOD]
      adaptive_p=1.0, adaptive_eps=1e-3,  # [MeanFlow, METHOD]
      cfg_scale=1.5,  # the teacher's guidance of the target: SiT's FID-50K setting [SiT]
      jvp_dtype="float32",  # [METHOD]
      optimizer=optimizer(1e-4, warmup_steps=1000, b1=0.9, b2=0.95))  # [MeanFlow] lr, betas

  c.distribution.update(
      num_steps=100_000, batch_size=256, log_every=100, checkpoint_every=5000, keep=3,
      ema_decay=0.999,  # [ours]
      update_ratio=5,  # [DMD2] ImageNet
      gen_adv_weight=3e-3, disc_weight=1e-2,  # [DMD2] ImageNet
      regulariser_weight=0.0,
      cfg_scale=1.5,  # real score's guidance [SiT's FID setting; ours for DMD]
      optimizer=optimizer(2e-6, b1=0.0, b2=0.99),  # [DMD2] generator lr 2e-6
      fake_optimizer=optimizer(2e-6, b1=0.0, b2=0.99),  # [DMD2]
      disc_optimizer=optimizer(2e-6, b1=0.0, b2=0.99))  # [ours]
  c.distribution.discriminator.update(hidden=1024)  # [ours]

  # The teacher's sampler as SiT's sample.py runs it: 250 Euler steps (SDE in their paper; ODE
  # here), CFG 1.5 on the first 3 of the 4 latent channels (forward_with_cfg), so that the
  # teacher row reproduces the published figure [SiT].
  c.sample.update(grid_size=64, teacher_steps=250, teacher_method="euler", cfg_scale=1.5,
                  guided_channels=3)

  c.eval = ml_collections.ConfigDict(dict(
      num_samples=50_000,  # [ADM] FID-50K (PITFALLS.md: never compare 10K with 50K)
      batch_size=256,
      teacher_steps=(250,),  # the 250-step teacher the paper compares with
      student_steps=(1, 2),
      reference_batch="",  # VIRTUAL_imagenet256_labeled.npz [ADM]
      inception_weights="",  # pt_inception-2015-12-05-6726825d.pth
      inception_preprocessing="tf",  # ADM's evaluator: TF1 bilinear resize, (x - 128) / 128
      inception_size=299,
      inception_width=1.0,  # < 1 only with random weights (runlocal)
      random_inception=False,  # tests and runlocal only
      use_stored_reference_stats=True,  # FID against the npz's mu/sigma when it has them [ADM]
      is_split_size=5000,  # [ADM] Inception Score over splits of 5,000 samples
      pr_k=3,  # [ADM, Kynkaanniemi et al.]
      save_npz=False))  # write samples as ADM's evaluator reads them (50K: ~9.8 GB)

  if arg == "runlocal":
    _runlocal(c)
  elif arg == "repa":
    _repa(c)
  elif arg == "dit":
    _dit(c)
  elif arg == "lightningdit":
    _lightningdit(c)
  elif arg:
    raise ValueError(f"experiments/imagenet256.py: unknown variant {arg!r}; use 'runlocal', "
                     "'repa', 'dit', 'lightningdit' or nothing.")
  return c


def _repa(c):
  """REPA's SiT-XL/2 (FID 1.42 in its README: 250 SDE steps, cfg 1.8, guidance interval
  [0, 0.7]) on the same SD-VAE ft-EMA latents (generate.py: --vae ema, x 0.18215)."""
  c.name = "imagenet256_repa"
  # REPA's path is ours (t = 1 noise, v = e - x, t embedded in [0, 1]); no learn_sigma half.
  c.model.update(out_channels=4, time_scale=1.0, time_flip=False, prediction="velocity")
  c.teacher.update(checkpoint_kind="repa")  # last.pt; its projectors are dropped on import
  # REPA's sampler (generate.py --cfg-scale 1.8 --guidance-high 0.7, guidance_low 0): guided
  # only while t <= 0.7, on every channel (no forward_with_cfg split) [REPA]. 250 steps as its
  # FID run; Euler ODE here where REPA's FID used its Euler-Maruyama SDE.
  c.sample.update(cfg_scale=1.8, cfg_interval=(0.0, 0.7), guided_channels=None,
                  teacher_steps=250)
  # The distillation targets guide as the teacher's best sampler does [REPA; ours for HD].
  c.trajectory.update(cfg_scale=1.8, cfg_interval=(0.0, 0.7))
  c.distribution.update(cfg_scale=1.8, cfg_interval=(0.0, 0.7))


def _lightningdit(c):
  """LightningDiT-XL/1 + VA-VAE (FID 1.35 in its README: 250-point Euler ODE, timestep shift
  0.3, cfg 6.7, cfg interval start 0.125; configs/reproductions/..._800ep_cfg.yaml)."""
  c.name = "imagenet256_lightningdit"
  # VA-VAE f16d32 (models/vae.VA_VAE_F16D32): 256x256 images -> 16x16x32 latents, each
  # channel normalised by latents_stats.pt, times latent_multiplier 1.0 [LightningDiT].
  c.vae.update(kind="vavae", variant="VA-VAE f16d32 (dinov2)",
               stats_path="",  # latents_stats.pt beside vavae-imagenet256-f16d32-dinov2.pt
               scaling_factor=1.0)
  c.vae.sizes.update(block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2,
                     norm_num_groups=32, latent_channels=32, attention_levels=(4,))
  # LightningDiT-XL/1: SwiGLU, RMSNorm, rotary q/k, no qk-norm, patch 1; SiT's time
  # convention (1 - t embedded, output negated on import: convert/lightningdit.py).
  c.model.update(name="lightningdit", input_size=16, in_channels=32, patch_size=1,
                 hidden_size=1152, depth=28, num_heads=16, out_channels=None, time_scale=1.0,
                 time_flip=True, prediction="velocity")
  c.model.use_rope, c.model.qk_norm = True, False
  c.teacher.update(checkpoint_kind="lightningdit")  # lightningdit-xl-imagenet256-800ep.pt
  # Its sampler (inference.py): Euler over torch.linspace(0, 1, 250) (249 steps) in its time
  # t' = 1 - t, warped by t' -> 0.3 t' / (1 - 0.7 t'), which on our grid is flow_shift(t, 1 /
  # 0.3); CFG 6.7 only while t' >= 0.125 (t <= 0.875), and, as forward_with_cfg is written, on
  # the first 3 of the 32 channels [LightningDiT].
  c.sample.update(teacher_steps=249, teacher_method="euler", shift=1.0 / 0.3, cfg_scale=6.7,
                  cfg_interval=(0.0, 0.875), guided_channels=3)
  c.eval.update(teacher_steps=(249,))
  # The distillation targets keep the all-channel guidance 1.5 of the default [ours, untuned]:
  # 6.7 on all 32 channels is not what the teacher's sampler does.


def _dit(c):
  """DiT-XL/2 (FID 2.27 in its README: 250 DDPM steps, cfg 1.5 on 3 of 4 channels)."""
  c.name = "imagenet256_dit"
  # A DDPM noise predictor (learn_sigma: 8 output channels) whose call returns our velocity
  # through the DDPM adapter; its student is a velocity DiT (models/dit.student_of).
  c.model.update(out_channels=8, prediction="ddpm_noise", time_scale=1.0, time_flip=False)
  c.teacher.update(checkpoint_kind="dit")
  # DiT's guidance (sample.py --cfg-scale 1.5, forward_with_cfg on 3 channels) [DiT]; its FID
  # used 250 ancestral DDPM steps, this is 250 Euler steps of the adapted ODE.
  c.sample.update(cfg_scale=1.5, guided_channels=3, teacher_steps=250)


def _runlocal(c):
  """A CPU smoke run of every piece: mock data, tiny random networks, a few steps."""
  c.name = "imagenet256_runlocal"
  c.stages = ("teacher", "trajectory", "distribution", "eval")
  c.mesh.update(data=-1, fsdp=1)
  c.data.update(image_size=32, mock_num_examples=64, num_shards=2, extract_batch_size=16)
  # 32x32 images -> 8x8x4 latents through a 3-level VAE of 8/16/16 channels.
  c.vae.update(random_init=True, batch_size=32)
  c.vae.sizes.update(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4)
  c.model.update(input_size=8, hidden_size=32, depth=2, num_heads=2, feature_layers=(0, 1),
                 dtype="float32", remat=False)
  for stage in (c.teacher, c.trajectory, c.distribution):
    stage.update(num_steps=4, batch_size=16, log_every=2, checkpoint_every=2)
  c.teacher.optimizer = optimizer(1e-3, warmup_steps=1)
  c.distribution.update(update_ratio=1)
  c.distribution.discriminator.update(hidden=16)
  c.sample.update(grid_size=16, teacher_steps=4)
  c.eval.update(num_samples=32, batch_size=16, teacher_steps=(4,), student_steps=(1,),
                random_inception=True, inception_width=0.125, inception_size=75,
                is_split_size=16)
