"""What the train steps and samplers cost, against what they should cost: one device, one run.

Prints, all measured in the same process on the same device:
  1. stage 1: its step time over a plain flow-matching step of the same student and batch, the
     teacher's guided forward timed apart (target: at most 1.3);
  2. stage 2: its step time against the sum of its passes, predicted from their FLOPs;
  3. utilisation: each step's achieved FLOP/s over the dense matmul FLOP/s of this device;
  4. sampling: one-step student throughput over the teacher's N-step CFG sampler (target: at
     least 400x at N = 250).

  python benchmarks/step_cost.py                  # CPU-sized: DiT-S/2 cut to depth 4 on 16x16x4
  python benchmarks/step_cost.py --size=XL/2 --depth=0 --input_size=32 --batch=32 \
      --dtype=bfloat16 --remat                    # SiT-XL/2 on ImageNet-256 latents (a GPU)

Times are medians of --iters runs after one warm-up, each ended by block_until_ready; programs
are compiled ahead of time, so no compile is timed. FLOPs come from XLA's cost analysis of the
compiled program (matmuls as 2 m n k, plus elementwise work). XLA counts a while loop's body
once, whatever its trip count: stage 2's scan over its k critic updates is corrected by adding
k - 1 critic passes (their optimiser updates, about 1 FLOP in 10^3 here, are left out).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common import base_config  # noqa: E402
from hierdistill import pipeline  # noqa: E402
from hierdistill.models import dit_config  # noqa: E402
from hierdistill.planning import analysis  # noqa: E402
from hierdistill.stages import common  # noqa: E402
from hierdistill.stages.distribution import DistributionStage  # noqa: E402
from hierdistill.stages.teacher import TeacherStage  # noqa: E402
from hierdistill.stages.trajectory import TrajectoryStage  # noqa: E402


def add_model_flags(parser: argparse.ArgumentParser, **defaults) -> None:
  """The flags that pick the network and its precision; memory.py shares them."""
  d = dict(size="S/2", depth=4, input_size=16, channels=4, num_classes=1000, dtype="float32",
           jvp_dtype="float32", remat=False, update_ratio=2, disc_hidden=256, cfg_scale=1.5)
  d.update(defaults)
  parser.add_argument("--backbone", default="dit", choices=("dit", "lightningdit"),
                      help="DiT/SiT (sizes S/2 ... XL/2), or LightningDiT (B/1 ... 1p6B/2)")
  parser.add_argument("--size", default=d["size"], help="a DiT size: S/2, B/2, L/2, XL/2")
  parser.add_argument("--depth", type=int, default=d["depth"],
                      help="blocks; 0 keeps the size's own (a cut model keeps ratios, compiles "
                           "faster)")
  parser.add_argument("--input_size", type=int, default=d["input_size"],
                      help="latent H = W (32 for ImageNet 256 through the SD VAE)")
  parser.add_argument("--channels", type=int, default=d["channels"])
  parser.add_argument("--num_classes", type=int, default=d["num_classes"])
  parser.add_argument("--dtype", default=d["dtype"], choices=("float32", "bfloat16"),
                      help="compute dtype; parameters and optimiser states stay float32")
  parser.add_argument("--jvp_dtype", default=d["jvp_dtype"], choices=("float32", "bfloat16"),
                      help="dtype of stage 1's JVP pass")
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=d["remat"],
                      help="rematerialise each block in the backward pass")
  parser.add_argument("--update_ratio", type=int, default=d["update_ratio"],
                      help="stage 2's critic updates per generator update (k)")
  parser.add_argument("--disc_hidden", type=int, default=d["disc_hidden"])
  parser.add_argument("--cfg_scale", type=float, default=d["cfg_scale"])


def build_config(args, batch_size: int):
  """The experiment config of the chosen network (every other key as in base_config)."""
  c = base_config()
  if getattr(args, "backbone", "dit") == "lightningdit":
    from hierdistill.models.lightningdit import lightningdit_config  # pylint: disable=g-import-not-at-top
    size = lightningdit_config(args.size)
    c.model.name = "lightningdit"
  else:
    size = dit_config(args.size)
  if args.depth:
    size["depth"] = args.depth
  depth = size["depth"]
  # The discriminator reads four depths spread over the fake network, the last block included.
  layers = tuple(sorted({max(depth * q // 4 - 1, 0) for q in (1, 2, 3, 4)}))
  c.model.update(size, input_size=args.input_size, in_channels=args.channels,
                 num_classes=args.num_classes, dtype=args.dtype, remat=args.remat,
                 feature_layers=layers)
  c.trajectory.jvp_dtype = args.jvp_dtype
  c.trajectory.cfg_scale = c.distribution.cfg_scale = c.sample.cfg_scale = args.cfg_scale
  c.distribution.update_ratio = args.update_ratio
  c.distribution.discriminator.hidden = args.disc_hidden
  for stage in (c.teacher, c.trajectory, c.distribution):
    stage.batch_size = batch_size
  return c


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


class Timed:
  """A program compiled ahead of time, its FLOPs, and a median timer."""

  total_compile_s = 0.0

  def __init__(self, fn, *args, donate: bool = False):
    t0 = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
    self.compiled = jitted.lower(*args).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = _flops(self.compiled)
    self.donate = donate
    Timed.total_compile_s += self.compile_s

  def median(self, *args, iters: int, warmup: bool = True) -> tuple[float, object]:
    """Median seconds of a call; a donating program is fed its own first output each call.

    warmup: one untimed call first, which pays for first-touch allocation and thread start-up;
    a call that runs for seconds (the teacher's sampler) may skip it.
    """
    args = list(args)
    out = None
    times = []
    for i in range(iters + int(warmup)):
      t0 = time.perf_counter()
      out = self.compiled(*args)
      jax.block_until_ready(out)
      if i or not warmup:
        times.append(time.perf_counter() - t0)
      if self.donate:
        args[0] = out[0]
    return statistics.median(times), out


def _perturbed(params, key, scale=0.02):
  """Zero-initialised layers (adaLN, final layer, interval embedder) made non-zero, so that
  every pass computes something non-trivial (a zero generator output zeroes DMD's normaliser)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                   for p, k in zip(leaves, keys)])


def dense_matmul_flops(n: int, dtype, iters: int) -> float:
  """FLOP/s of an n x n x n matmul in the compute dtype, accumulated in float32: the ceiling
  every step's utilisation is measured against (on this device, in this run)."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  mm = Timed(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), a, b)
  sec, _ = mm.median(a, b, iters=iters)
  return 2.0 * n ** 3 / sec


def _row(name, sec, flops, peak, extra=""):
  rate = flops / sec
  return (f"  {name:<44} {sec * 1e3:10.2f} ms {flops / 1e9:10.2f} GFLOP "
          f"{rate / 1e12:8.3f} TFLOP/s  util {rate / peak:6.1%}{extra}")


class _StudentOnly(TrajectoryStage):
  """Stage 1 with the teacher's guided velocity replaced by a free stand-in of the same shape:
  the student's share of the step (JVP, backward, update) alone."""

  def teacher_velocity(self, teacher_params, z_t, t, y):
    del teacher_params, t, y
    return jax.lax.stop_gradient(0.5 * z_t)


def flops_only(config, nets, args, shape) -> dict:
  """FLOPs of the plain flow-matching step and of stage 1's student share, from the compiler."""
  b = args.batch
  ex_x, ex_y = jnp.zeros((1,) + shape), jnp.zeros((1,), jnp.int32)
  batch = {"x": jax.ShapeDtypeStruct((b,) + shape, jnp.float32),
           "c": jax.ShapeDtypeStruct((b,), jnp.int32)}
  teacher = nets.abstract_params(shape, student=False)
  fm_stage = TeacherStage(config, nets.student)
  fm_state = jax.eval_shape(lambda r: fm_stage.init(r, ex_x, ex_y), jax.random.PRNGKey(0))
  alone = _StudentOnly(config, nets.student, nets.teacher)
  s1_state = jax.eval_shape(lambda r, i: alone.init(r, ex_x, ex_y, i), jax.random.PRNGKey(0),
                            {"teacher": teacher})
  fm = _flops(jax.jit(fm_stage.train_step).lower(fm_state, {}, batch).compile())
  s1 = _flops(jax.jit(alone.train_step).lower(s1_state, {"teacher": teacher}, batch).compile())
  print(f"FLOPs: flow-matching step {fm / 1e9:.2f} G, stage-1 step student only "
        f"{s1 / 1e9:.2f} G; ratio {s1 / fm:.3f} (compute {args.dtype}, JVP {args.jvp_dtype}, "
        f"remat {args.remat})")
  return {"stage1 FLOPs/fm FLOPs (student only)": s1 / fm}


def forwards_per_step(config, nets, shape) -> dict:
  """One train step of each distillation stage of `config`, in forward passes of its student at
  the stage's batch: the "in forwards" unit of the tables this script prints, from XLA's cost
  analysis of the steps compiled (never run) for this config, on abstract inputs.

  Returns {'trajectory': ..., 'distribution': ...}. Stage 2's scan over its k critic updates is
  counted k times (XLA counts the body of a loop it kept once). hd_curves.py draws training
  cost with it.
  """
  key = jax.random.PRNGKey(0)
  ex_x = jnp.zeros((1,) + tuple(shape), jnp.float32)
  ex_c = jax.tree.map(jnp.asarray, nets.conditions.example(1))
  teacher = nets.abstract_params(shape, student=False)
  student = nets.abstract_params(shape, student=True)
  frozen = {"teacher": teacher}

  def batch_of(b, rows=0):
    x = jax.ShapeDtypeStruct((b,) + ((rows,) if rows else ()) + tuple(shape), jnp.float32)
    c = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        (b,) + ((rows,) if rows else ()) + a.shape[1:], a.dtype), nets.conditions.abstract(b))
    return {"x": x, "c": c}

  def forward_flops(b):
    z, t = jax.ShapeDtypeStruct((b,) + tuple(shape), jnp.float32), jax.ShapeDtypeStruct(
        (b,), jnp.float32)
    return _flops(jax.jit(lambda p, z, t, c: common.apply_model(nets.student, p, z, t, t, c))
                  .lower(student, z, t, nets.conditions.abstract(b)).compile())

  out = {}
  b1 = int(config.trajectory.batch_size)
  stage1 = TrajectoryStage(config, nets.student, nets.teacher, nets.conditions)
  state1 = jax.eval_shape(lambda r, i: stage1.init(r, ex_x, ex_c, i), key, frozen)
  out["trajectory"] = _flops(jax.jit(stage1.train_step).lower(
      state1, frozen, batch_of(b1)).compile()) / forward_flops(b1)

  b2 = int(config.distribution.batch_size)
  stage2 = DistributionStage(config, nets.student, nets.teacher, nets.discriminator,
                             nets.conditions)
  k = stage2.k
  state2 = jax.eval_shape(lambda r, i: stage2.init(r, ex_x, ex_c, i), key,
                          {"generator": student, "teacher": teacher})
  compiled = jax.jit(stage2.train_step).lower(state2, frozen, batch_of(b2, k + 1)).compile()
  step_flops = _flops(compiled)
  # A compiler that unrolled the critic loop has counted every update already.
  kept = k in analysis.loop_trip_counts(compiled.as_text())
  one = batch_of(b2)
  draws = jax.eval_shape(stage2.critic_draws, key, one["x"])
  critic_flops = _flops(jax.jit(jax.value_and_grad(stage2.critic_loss, has_aux=True)).lower(
      (state2.fake_params, state2.disc_params), state2.params, teacher, one["x"], one["c"],
      draws).compile())
  out["distribution"] = (step_flops + (k - 1) * critic_flops * kept) / forward_flops(b2)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_model_flags(parser)
  parser.add_argument("--batch", type=int, default=4, help="per-step batch (each minibatch)")
  parser.add_argument("--sample_batch", type=int, default=0, help="0 = --batch")
  parser.add_argument("--teacher_steps", type=int, default=250)
  parser.add_argument("--teacher_timed_steps", type=int, default=0,
                      help="time the teacher's sampler over this many steps and scale to "
                           "--teacher_steps (its steps are identical work); 0 = all of them")
  parser.add_argument("--teacher_method", default="euler", choices=("euler", "heun"))
  parser.add_argument("--iters", type=int, default=5, help="timed calls per figure (median)")
  parser.add_argument("--sample_iters", type=int, default=1,
                      help="timed calls of the teacher's sampler (N steps each, no warm-up)")
  parser.add_argument("--matmul_size", type=int, default=0,
                      help="n of the reference n^3 matmul; 0 = 2048 on CPU, 8192 elsewhere")
  parser.add_argument("--flops_only", action="store_true",
                      help="compile the flow-matching and stage-1 steps and compare their FLOPs "
                           "only (no timing): the JVP's intrinsic price, immune to a busy host")
  parser.add_argument("--skip", default="", help="comma-separated sections to skip: "
                      "stage1,stage2,sampling")
  args = parser.parse_args(argv)
  jax.config.update("jax_threefry_partitionable", True)
  skip = set(filter(None, args.skip.split(",")))

  device = jax.devices()[0]
  config = build_config(args, args.batch)
  nets = pipeline.Networks(config)
  dtype = common.dtype_of(args.dtype)
  b, k = args.batch, args.update_ratio
  shape = (args.input_size, args.input_size, args.channels)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(
      nets.abstract_params(shape, student=True)))
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
  print(f"model: DiT-{args.size} depth {config.model.depth} width {config.model.hidden_size} "
        f"({n_params / 1e6:.1f}M params), input {shape}, "
        f"{(args.input_size // config.model.patch_size) ** 2} tokens, batch {b}, compute {args.dtype}, JVP {args.jvp_dtype}, remat {args.remat}, "
        f"k = {k}")

  if args.flops_only:
    return flops_only(config, nets, args, shape)

  matmul_n = args.matmul_size or (2048 if device.platform == "cpu" else 8192)
  peak = dense_matmul_flops(matmul_n, dtype, args.iters)
  print(f"dense matmul {matmul_n}^3 ({args.dtype} in, float32 accumulation): "
        f"{peak / 1e12:.3f} TFLOP/s  <- utilisation is measured against this\n")

  rng = jax.random.PRNGKey(0)
  k_init, k_pert, k_x, k_y, k_s = jax.random.split(rng, 5)
  ex_x, ex_y = jnp.zeros((1,) + shape), jnp.zeros((1,), jnp.int32)
  x = jax.random.normal(k_x, (b, k + 1) + shape)
  y = jax.random.randint(k_y, (b, k + 1), 0, args.num_classes)
  batch = {"x": x[:, 0], "c": y[:, 0]}
  key = jax.random.PRNGKey(1)

  teacher_stage = TeacherStage(config, nets.teacher)
  teacher_params = jax.jit(lambda r: _perturbed(
      teacher_stage.init(r, ex_x, ex_y).params, k_pert))(k_init)
  frozen = {"teacher": teacher_params}
  stage1 = TrajectoryStage(config, nets.student, nets.teacher)
  init1 = jax.jit(lambda r, i: stage1.init(r, ex_x, ex_y, i))
  student_params = init1(k_init, frozen).params

  # One student forward at batch B: the unit the passes are counted in.
  fwd = Timed(lambda p, z, t, yy: common.apply_model(nets.student, p, z, t, t, yy),
              student_params, batch["x"], jnp.ones((b,)), batch["c"])
  t_fwd, _ = fwd.median(student_params, batch["x"], jnp.ones((b,)), batch["c"],
                        iters=args.iters)
  print("pass / step                                       time          FLOPs    achieved"
        "      utilisation")
  print(_row("student forward (batch B)", t_fwd, fwd.flops, peak))
  results = {}

  # ---- the reference: a plain flow-matching step of the same student and batch ------------
  fm_stage = TeacherStage(config, nets.student)
  fm_state = jax.jit(lambda r: fm_stage.init(r, ex_x, ex_y).replace(
      params=student_params, ema_params=student_params))(k_init)
  fm = Timed(fm_stage.train_step, fm_state, {}, batch, donate=True)
  t_fm, _ = fm.median(fm_state, {}, batch, iters=args.iters)
  del fm_state
  fm_rate = fm.flops / t_fm
  print(_row("flow-matching step (fwd + bwd + AdamW + EMA)", t_fm, fm.flops, peak,
             f"  = {fm.flops / fwd.flops:.2f} fwd"))

  if "stage1" not in skip:
    state1 = init1(k_init, frozen)
    s1 = Timed(stage1.train_step, state1, frozen, batch, donate=True)
    t_s1, state1 = s1.median(state1, frozen, batch, iters=args.iters)
    state1 = state1[0]
    z = batch["x"]
    t_vec = jax.random.uniform(k_s, (b,))
    tv = Timed(stage1.teacher_velocity, teacher_params, z, t_vec, batch["c"])
    t_tv, _ = tv.median(teacher_params, z, t_vec, batch["c"], iters=args.iters)
    alone = _StudentOnly(config, nets.student, nets.teacher)
    s1a = Timed(alone.train_step, state1, frozen, batch, donate=True)
    t_s1a, _ = s1a.median(state1, frozen, batch, iters=args.iters)
    del state1
    print(_row("stage-1 step (teacher CFG + JVP + bwd + update)", t_s1, s1.flops, peak,
               f"  = {s1.flops / fwd.flops:.2f} fwd"))
    print(_row("  teacher guided velocity (CFG, batch 2B)", t_tv, tv.flops, peak,
               f"  = {tv.flops / fwd.flops:.2f} fwd"))
    print(_row("  stage-1 step, student only (teacher stubbed)", t_s1a, s1a.flops, peak,
               f"  = {s1a.flops / fwd.flops:.2f} fwd"))
    results["stage1/fm"] = t_s1a / t_fm
    results["(stage1 - teacher)/fm"] = (t_s1 - t_tv) / t_fm
    results["stage1 FLOPs/fm FLOPs (student only)"] = s1a.flops / fm.flops

  if "stage2" not in skip:
    stage2 = DistributionStage(config, nets.student, nets.teacher, nets.discriminator)
    state2 = jax.jit(lambda r, i: stage2.init(r, ex_x, ex_y, i))(
        k_init, {"generator": student_params, "teacher": teacher_params})
    batch2 = {"x": x, "c": y}
    critic_draws = stage2.critic_draws(key, x[:, 0])
    critic = Timed(jax.value_and_grad(stage2.critic_loss, has_aux=True),
                   (state2.fake_params, state2.disc_params), state2.params, teacher_params,
                   x[:, 0], y[:, 0], critic_draws)
    t_critic, _ = critic.median((state2.fake_params, state2.disc_params), state2.params,
                                teacher_params, x[:, 0], y[:, 0], critic_draws,
                                iters=args.iters)
    gen_draws = stage2.generator_draws(key, x[:, k])
    gen = Timed(jax.value_and_grad(stage2.generator_loss, has_aux=True), state2.params,
                (state2.fake_params, state2.disc_params), teacher_params, x[:, k], y[:, k],
                gen_draws)
    t_gen, _ = gen.median(state2.params, (state2.fake_params, state2.disc_params),
                          teacher_params, x[:, k], y[:, k], gen_draws, iters=args.iters)
    s2 = Timed(stage2.train_step, state2, frozen, batch2, donate=True)
    t_s2, _ = s2.median(state2, frozen, batch2, iters=args.iters)
    del state2
    # XLA counts the scan's body once: add the k - 1 critic passes it leaves out.
    s2_flops = s2.flops + (k - 1) * critic.flops
    passes_flops = k * critic.flops + gen.flops
    predicted = passes_flops / fm_rate
    print(_row("stage-2 step (k critic updates + generator)", t_s2, s2_flops, peak,
               f"  = {s2_flops / fwd.flops:.2f} fwd"))
    print(_row(f"  critic pass (fake FM + disc, fwd + bwd) x{k}", t_critic, critic.flops, peak,
               f"  = {critic.flops / fwd.flops:.2f} fwd each"))
    print(_row("  generator pass (DMD + adv, fwd + bwd) x1", t_gen, gen.flops, peak,
               f"  = {gen.flops / fwd.flops:.2f} fwd"))
    results["stage2 / predicted from FLOPs"] = t_s2 / predicted
    results["stage2 / sum of timed passes"] = t_s2 / (k * t_critic + t_gen)
    print(f"  predicted from FLOPs at the flow-matching step's rate: {predicted * 1e3:.2f} ms "
          f"(passes {passes_flops / 1e9:.2f} GFLOP / {fm_rate / 1e12:.3f} TFLOP/s); "
          f"sum of timed passes {(k * t_critic + t_gen) * 1e3:.2f} ms")

  if "sampling" not in skip:
    sb = args.sample_batch or b
    noise = jax.random.normal(k_s, (sb,) + shape)
    labels = jnp.arange(sb, dtype=jnp.int32) % args.num_classes
    one = Timed(lambda p, e, yy: stage1.sample(p, e, yy, num_steps=1), student_params, noise,
                labels)
    t_one, _ = one.median(student_params, noise, labels, iters=args.iters)
    timed_steps = args.teacher_timed_steps or args.teacher_steps
    many = Timed(lambda p, e, yy: teacher_stage.sample(p, e, yy, num_steps=timed_steps),
                 teacher_params, noise, labels)
    t_many, _ = many.median(teacher_params, noise, labels, iters=args.sample_iters,
                            warmup=False)
    if timed_steps != args.teacher_steps:
      print(f"(teacher sampler timed over {timed_steps} steps, scaled to {args.teacher_steps})")
      t_many *= args.teacher_steps / timed_steps
    print(f"\nsampling, batch {sb}: one-step student {sb / t_one:10.2f} samples/s "
          f"({t_one * 1e3:.2f} ms); teacher {args.teacher_steps}-step {args.teacher_method} "
          f"with CFG {args.cfg_scale} {sb / t_many:10.4f} samples/s ({t_many:.2f} s)")
    results[f"student 1-step / teacher {args.teacher_steps}-step CFG throughput"] = t_many / t_one

  print("\nratios (same device, same run)")
  targets = {"stage1/fm": "target <= 1.3",
             f"student 1-step / teacher {args.teacher_steps}-step CFG throughput":
                 "target >= 400"}
  for name, value in results.items():
    print(f"  {name:<58} {value:9.3f}   {targets.get(name, '')}")
  print(f"  {'flow-matching step utilisation':<58} {fm_rate / peak:9.1%}")
  print(f"\n(compiling took {Timed.total_compile_s:.0f} s of the run, none of it timed)")
  return results


if __name__ == "__main__":
  main()
