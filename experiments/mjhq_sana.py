"""Text-to-image with a SANA teacher, evaluated on MJHQ-30K: the paper's second experiment
(docs/t2i.md).

Before the first run, make the training shards once (one of the two real-data sources):
  python launch/extract_t2i_latents.py --config=experiments/mjhq_sana.py \
      --config.data.real_source=images --config.data.captions_file=pairs.jsonl \
      --config.data.images_dir=DIR --config.data.latents_dir=OUT ...
  python launch/extract_t2i_latents.py --config=experiments/mjhq_sana.py \
      --config.data.real_source=teacher --config.data.prompts_file=prompts.txt ...
then: python launch/main.py --config=experiments/mjhq_sana.py --workdir=...
Files the run needs (a missing one stops it before anything compiles, naming its key):
  teacher.init_checkpoint  Sana_1600M_1024px_MultiLing.pth (Efficient-Large-Model/Sana_1600M_1024px,
                           checkpoints/), or transformer/diffusion_pytorch_model.safetensors of
                           Efficient-Large-Model/Sana_1600M_1024px_diffusers (0.6B / 512 px alike)
  vae.path                 mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (diffusers folder)
  text_encoder.path        Efficient-Large-Model/gemma-2-2b-it (HF folder, tokenizer.json inside)
  data.latents_dir         the shards of launch/extract_t2i_latents.py
  eval.mjhq_meta, eval.mjhq_images   playgroundai/MJHQ-30K: meta_data.json, mjhq30k_imgs.zip
  eval.inception_weights   pt_inception-2015-12-05-6726825d.pth (pytorch-fid release)
  clip.path                openai/clip-vit-large-patch14 (HF folder, tokenizer.json inside)

Where each default comes from: [SANA] Xie et al. 2024 and NVlabs/Sana (configs, inference and
metric scripts), [SANA-Sprint] Chen et al. 2025, [DMD2] Yin et al. 2024 (its SDXL settings),
[MeanFlow] Geng et al. 2025, [ours] our choice.

Variants (the arg after the colon, comma-separated): '0.6B' or '1.6B' (default 1.6B), '512' or
'1024' (default 1024), e.g. experiments/mjhq_sana.py:0.6B,512; and 'runlocal': the whole chain
and the MJHQ evaluation on a CPU in minutes with tiny random SANA, DC-AE, Gemma-2 and CLIP and
mock prompts and images (data/t2i_mock.py). Its numbers mean nothing.
"""
import ml_collections

from experiments.common import base_config, optimizer

SIZES = {  # [SANA] depth, width and heads of the published transformers (models/sana.py)
    "0.6B": dict(depth=28, hidden_size=1152, num_heads=36, cross_num_heads=16,
                 feature_layers=(3, 11, 19, 27)),  # [ours] Sprint's spacing on 28 blocks
    "1.6B": dict(depth=20, hidden_size=2240, num_heads=70, cross_num_heads=20,
                 feature_layers=(2, 8, 14, 19)),  # [SANA-Sprint] LADD's discriminator blocks
}
RESOLUTIONS = ("512", "1024")


def get_config(arg=None):
  tokens = [t for t in (arg or "").split(",") if t]
  unknown = [t for t in tokens if t not in tuple(SIZES) + RESOLUTIONS + ("runlocal",)]
  if unknown:
    raise ValueError(f"experiments/mjhq_sana.py: unknown variant {unknown[0]!r}; use "
                     f"{', '.join(tuple(SIZES) + RESOLUTIONS)} or 'runlocal', comma-separated.")
  size = next((t for t in tokens if t in SIZES), "1.6B")
  px = int(next((t for t in tokens if t in RESOLUTIONS), "1024"))

  c = base_config()
  c.name = f"mjhq_sana_{size}_{px}"
  # The teacher is imported, not trained: the chain starts at stage 1.
  c.stages = ("trajectory", "distribution", "eval")
  # Three SANA networks in stage 2: shard every weight over up to 64 chips, and repeat those
  # groups along data past 64 (sharding.make_mesh). 64 divides SANA's widths (1152, 2240 and
  # their MLPs'); 256 divides none of them, so fsdp over a whole v5e 16x16 shards nothing [ours].
  c.mesh.update(data=-1, fsdp=64)
  # GLUMBConv's 3x3 depthwise kernels stay whole on every chip: 9 weights a channel, against
  # activations of 1,024 tokens x 11,200 channels a sample. Sharded over fsdp, the compiler
  # moves the activations to the kernel's channels instead, and on a hybrid mesh it gathers the
  # whole batch's (benchmarks/README.md, "TPU plans") [ours].
  c.sharding_rules = ((r"(^|/)conv_depth/", "replicate"), (".*", "fsdp"))

  c.data = ml_collections.ConfigDict(dict(
      name="t2i_latents",
      latents_dir="",  # shards of launch/extract_t2i_latents.py
      real_source="images",  # 'images' (an image-caption set) or 'teacher' (its samples)
      captions_file="", images_dir="",  # real_source='images': JSONL {"image", "caption"}
      prompts_file="",  # real_source='teacher': JSONL {"caption"} or one prompt a line
      teacher_steps=50,  # the teacher that makes reals: 50 steps [HD paper's SANA teacher]
      image_size=px,  # [SANA] 512 or 1024 px, square centre crops here [ours]
      seed=0, num_shards=1024, extract_batch_size=64,  # extraction only [ours]
      mock_num_examples=0, mock_mjhq_per_category=0))  # > 0: runlocal's mock files

  # DC-AE f32c32, latents x 0.41407 [SANA].
  c.vae = ml_collections.ConfigDict(dict(
      path="", scaling_factor=0.41407, random_init=False,
      sizes=ml_collections.ConfigDict(),  # random_init only: AutoencoderDC fields
      batch_size=16))  # decoding batch of the sample grids [ours]

  # Gemma-2-2B-IT, frozen; the complex human instruction and 300 tokens [SANA]. Captions are
  # encoded once at extraction (data/text_latents.py), so no train step runs the encoder.
  c.text_encoder = ml_collections.ConfigDict(dict(
      path="", tokenizer="",  # '' = tokenizer.json beside the weights
      use_instruction=True, max_sequence_length=300, dtype="bfloat16",  # [SANA]
      # Prompts a chip encodes at a time [ours]: 64 with the instruction, planned at the most
      # tokens it can take, do not fit a v5e chip beside the 2B weights (16.04 GiB; 16: 8.32;
      # launch/plan.py --programs=encoder).
      batch_size=16,
      random_init=False, sizes=ml_collections.ConfigDict()))  # random_init: GEMMA2_TINY + sizes

  c.clip = ml_collections.ConfigDict(dict(path="", tokenizer="", random_init=False))

  c.model = ml_collections.ConfigDict(dict(
      name="sana", in_channels=32, patch_size=1, mlp_ratio=2.5, caption_channels=2304,
      qk_norm=False,  # [SANA] 1.0 teachers
      time_scale=1000.0,  # [SANA] timesteps 1000 sigma
      interval_scale=1000.0,  # the student's interval embedder reads 1000 (t - r) [ours]
      dtype="bfloat16", param_dtype="float32", remat=True,  # [ours]
      remat_policy="nothing_saveable",  # models/remat.py [ours]
      scan_blocks=False,  # models/block_stack.py [ours]
      **SIZES[size]))

  c.teacher.update(init_checkpoint="")  # a published SANA file (above)

  c.trajectory.update(
      num_steps=20_000, batch_size=256,  # [MeanFlow] batch; length [ours]
      log_every=100, checkpoint_every=1000, keep=3,
      ema_decay=0.9999,  # [MeanFlow]
      rt_mu=-0.4, rt_sigma=1.0, equal_fraction=0.75,  # [MeanFlow]
      adaptive_p=1.0, adaptive_eps=1e-3,  # [MeanFlow]
      cfg_scale=4.5,  # the teacher's guidance of the target [SANA]
      jvp_dtype="float32",
      optimizer=optimizer(1e-5, warmup_steps=1000, b1=0.9, b2=0.95))  # fine-tuning rate [ours]

  c.distribution.update(
      num_steps=20_000, batch_size=256, log_every=100, checkpoint_every=1000, keep=3,
      ema_decay=0.999,  # [ours]
      update_ratio=5,  # [DMD2]
      gen_adv_weight=5e-3, disc_weight=1e-2,  # [DMD2] SDXL
      cfg_scale=4.5,  # real score's guidance [SANA]
      optimizer=optimizer(5e-7, b1=0.0, b2=0.99),  # [DMD2] SDXL generator rate
      fake_optimizer=optimizer(5e-7, b1=0.0, b2=0.99),  # [DMD2] SDXL
      disc_optimizer=optimizer(5e-6, b1=0.0, b2=0.99))  # [ours]
  c.distribution.discriminator.update(hidden=1024)  # [ours]

  # The teacher as SANA samples it: Flow-DPM-Solver, 20 steps, flow shift 3, CFG 4.5 against
  # the empty prompt, integer timesteps [SANA]. Grid rows share a prompt.
  c.sample.update(grid_size=16, teacher_steps=20, teacher_method="dpm++2m", cfg_scale=4.5)
  c.sample.shift = 3.0
  c.sample.integer_timesteps = True
  c.sample.grid_prompts = (
      "a cyberpunk cat with a neon sign that says 'Sana'",
      "a red fox in the snow at dawn, detailed fur, golden light",
      "a bowl of ramen on a wooden table, top view",
      "a minimalist logo of a mountain, flat vector")  # [ours]

  c.eval = ml_collections.ConfigDict(dict(
      num_samples=30_000,  # [SANA] every MJHQ prompt once
      batch_size=64,  # [ours] (SANA's scripts: 50); rounded up to the devices
      teacher_steps=(20,),  # [SANA-Sprint] the teachers' row of its table
      student_steps=(1, 2, 4),  # [SANA-Sprint] its one-, two- and four-step rows
      size=512,  # [SANA] Resize + CenterCrop of tools/metrics (bash_run_inference_metric.sh)
      mjhq_meta="", mjhq_images="",
      reference_stats="",  # '' = <workdir>/eval/mjhq_reference_<size>px.npz
      inception_weights="", inception_width=1.0, inception_size=299,  # pytorch-fid
      random_inception=False))

  if "runlocal" in tokens:
    _runlocal(c)
  return c


def _runlocal(c):
  """A CPU smoke run of every piece: mock files, tiny random networks, a few steps."""
  c.name = "mjhq_sana_runlocal"
  c.mesh.update(data=-1, fsdp=1)
  c.data.update(image_size=32, mock_num_examples=32, mock_mjhq_per_category=2, num_shards=2,
                extract_batch_size=8)
  # 32 px -> 8x8x4 latents through a 3-stage DC-AE of 8/16/32 channels.
  c.vae.update(random_init=True, batch_size=8)
  c.vae.sizes = ml_collections.ConfigDict(dict(
      in_channels=3, latent_channels=4, attention_head_dim=8,
      encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
      decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
      encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
      encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
      encoder_qkv_multiscales=((), (3,), (3,)), decoder_qkv_multiscales=((), (3,), (3,))))
  c.text_encoder.update(random_init=True, max_sequence_length=24, dtype="float32")
  c.clip.update(random_init=True)
  c.model.update(in_channels=4, hidden_size=32, depth=2, num_heads=2, cross_num_heads=2,
                 caption_channels=64,  # GEMMA2_TINY's width
                 feature_layers=(0, 1), dtype="float32", remat=False)
  for stage in (c.trajectory, c.distribution):
    stage.update(num_steps=4, batch_size=8, log_every=2, checkpoint_every=2)
  c.trajectory.optimizer = optimizer(1e-3, warmup_steps=1)
  c.distribution.update(update_ratio=1)
  c.distribution.discriminator.update(hidden=16)
  c.sample.update(grid_size=8, teacher_steps=4)
  c.eval.update(num_samples=20, batch_size=8, teacher_steps=(4,), student_steps=(1,), size=32,
                random_inception=True, inception_width=0.125, inception_size=75)
