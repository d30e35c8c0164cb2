"""Per-device memory of the stage-1 and stage-2 train steps under FSDP, before renting a pod.

Each train step is compiled ahead of time for N devices from abstract shapes (jax.eval_shape):
no parameter, optimiser state or batch is ever allocated, so SiT-XL/2 on 64 devices is planned
on a laptop. The per-device figures are the compiler's own (memory_analysis of the compiled
program), set beside what the partition rules should give (shapes / shardings).

  python benchmarks/memory.py                        # SiT-XL/2, batch 256, N = 8 and 64 fake
                                                     # CPU devices (the CPU compiler's figures)
  python benchmarks/memory.py --target=tpu-v5e       # the TPU compiler, for a v5e-8 and a v5e-64
                                                     # (needs libtpu: pip install -e '.[tpu]';
                                                     # launch/plan.py plans whole runs, any slice)
  python benchmarks/memory.py --size=B/2 --devices=8 --stages=trajectory   # quicker
  python benchmarks/memory.py --model=sana --devices=64 --depths=2,4   # SANA-1.6B at 1024 px
                                                     # (experiments/mjhq_sana.py), text batches

The CPU target lays the devices out as --xla_force_host_platform_device_count fake CPU devices
(set here, before jax starts). Its compiler plans buffers like any XLA backend, but it fuses
less than the TPU or GPU ones and computes bfloat16 dots in float32, so its temporaries are
an upper bound. It is run with XLA:CPU's memory-minimising scheduler (--cpu_scheduler): its
default one favours concurrency and issues every weight all-gather at the start of the step,
which no memory-limited TPU or GPU schedule would. The tpu-v5e target compiles with the real
TPU compiler for a v5e topology (no TPU needed: libtpu compiles for a described topology).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

GiB = 2 ** 30
# v5e slices by chip count: the topology names libtpu compiles for (one core per chip).
V5E_TOPOLOGIES = {4: "v5e:2x2", 8: "v5e:2x4", 16: "v5e:4x4", 32: "v5e:4x8", 64: "v5e:8x8",
                  128: "v5e:8x16", 256: "v5e:16x16"}
V5E_HBM_GIB = 16
CPU_SCHEDULERS = {"memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                  "default": "CPU_SCHEDULER_TYPE_DEFAULT"}


def parse_args(argv=None):
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, here)
  sys.path.insert(0, os.path.dirname(here))
  # step_cost imports jax: take only its flag helper's source of truth after the env is set.
  # No abbreviations: --depth (the model's flag) would otherwise be read as --depths.
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  parser.add_argument("--target", default="cpu", choices=("cpu", "tpu-v5e"))
  parser.add_argument("--devices", default="8,64", help="comma-separated device counts N")
  parser.add_argument("--stages", default="trajectory,distribution",
                      help="any of teacher (a plain flow-matching step), trajectory, distribution")
  parser.add_argument("--batch", type=int, default=256, help="global batch (each minibatch)")
  parser.add_argument("--mesh", default="fsdp", choices=("fsdp", "hybrid"),
                      help="fsdp: (data, fsdp) = (1, N); hybrid: (N / 8, 8)")
  parser.add_argument("--hbm_gib", type=float, default=V5E_HBM_GIB,
                      help="per-device memory the plan must fit (v5e: 16 GiB)")
  parser.add_argument("--depths", default="",
                      help="comma-separated reduced depths to compile (e.g. 2,4): the full "
                           "depth's temp is extrapolated from them, its weights from shapes")
  parser.add_argument("--compile_level", type=int, default=-1,
                      help="CPU target: xla_backend_optimization_level (0 compiles several times "
                           "faster; buffer assignment is unchanged); -1 = XLA's default")
  parser.add_argument("--cpu_scheduler", default="memory", choices=tuple(CPU_SCHEDULERS),
                      help="CPU target: XLA:CPU's instruction scheduler. 'memory' (minimise live "
                           "memory, as the TPU/GPU schedulers do under their memory limit) or "
                           "'default' (XLA:CPU's own, which favours concurrency: it issues "
                           "every weight all-gather at the start of the step)")
  parser.add_argument("--model", default="dit", choices=("dit", "sana"),
                      help="dit: the DiT/SiT flags below; sana: experiments/mjhq_sana.py's "
                           "network (--sana=1.6B,1024), batches of text conditions")
  parser.add_argument("--sana", default="1.6B,1024",
                      help="--model=sana: the variant of experiments/mjhq_sana.py")
  parser.add_argument("--dump_hlo", default="",
                      help="a folder to write each compiled program's HLO text to (to see "
                           "what is gathered: grep all-gather)")
  args, rest = parser.parse_known_args(argv)
  args.device_counts = [int(n) for n in args.devices.split(",")]
  return args, rest


def main(argv=None):
  args, rest = parse_args(argv)
  if args.target == "cpu":
    # The device count is read once, when the backend starts: before jax is imported.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count="
                               f"{max(args.device_counts)}")
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; libtpu compiles

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import step_cost  # pylint: disable=g-import-not-at-top
  from hierdistill import pipeline  # pylint: disable=g-import-not-at-top
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top
  from hierdistill.planning import programs  # pylint: disable=g-import-not-at-top

  model_parser = argparse.ArgumentParser()
  # The planning default: SiT-XL/2 on ImageNet-256 latents, bf16 compute, remat on.
  step_cost.add_model_flags(model_parser, size="XL/2", depth=0, input_size=32, dtype="bfloat16",
                            remat=True)
  margs = model_parser.parse_args(rest)
  jax.config.update("jax_threefry_partitionable", True)
  depths = [int(d) for d in args.depths.split(",")] if args.depths else []
  if args.model == "sana":
    build_config = lambda depth=0: _sana_config(args, depth)
    full = build_config()
    # The text condition of SANA (planning.programs.condition_kind): 300 Gemma-2 tokens of
    # width 2304, stored at extraction (the encoder runs in no train step).
    px = full.data.image_size
    shape = (px // 32, px // 32, full.model.in_channels)
    label = f"SANA-{args.sana.split(',')[0]} at {px} px"
    margs.dtype, margs.jvp_dtype, margs.remat = (full.model.dtype, full.trajectory.jvp_dtype,
                                                 full.model.remat)
    margs.update_ratio = full.distribution.update_ratio
  else:
    def build_config(depth=0):
      if depth:
        margs.depth = depth
      return step_cost.build_config(margs, args.batch)
    full = build_config()
    shape = (margs.input_size, margs.input_size, margs.channels)
    label = f"DiT-{margs.size}"
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(
      pipeline.Networks(full, programs.condition_kind(full)).abstract_params(
          shape, student=True)))
  print(f"{label} depth {full.model.depth} ({n_params / 1e6:.0f}M params per "
        f"network), input {shape}, global batch {args.batch}, compute {margs.dtype}, JVP "
        f"{margs.jvp_dtype}, remat {margs.remat}, k = {margs.update_ratio}, target "
        f"{args.target}, mesh {args.mesh}")
  print("per-device GiB: weights = params + EMA (+ fake, disc) + frozen teacher; optim = "
        "AdamW moments; both from shapes\nand shardings. args / temp / total from the "
        "compiler: total = args + outputs - donated aliases + temp.")
  if depths:
    print(f"Compiled at depths {depths} only; the 'depth {full.model.depth}' rows take weights, "
          "optim and args from shapes and\nextrapolate temp linearly in depth (remat keeps one "
          "residual and one gradient set a block).")
  header = (f"\n{'N':>4} {'stage':<13} {'depth':>5} {'mesh':>6} {'weights':>8} {'optim':>7} "
            f"{'args':>7} {'temp':>7} {'total':>7}  fits {args.hbm_gib:g} GiB  compile")
  print(header)
  print("-" * len(header))

  def layout(config, name, mesh):
    """The stage's step as planning.programs lays it out for launch/plan.py: abstract
    (state, frozen, batch), their shardings, and the per-device bytes from shapes."""
    (program,) = programs.build(config, mesh, (name,))
    return program

  def from_shapes(program) -> dict:
    weights = program.params_bytes
    return {"weights": weights, "optim": program.optim_bytes,
            "args": weights + program.optim_bytes + program.batch_bytes}

  def compile_one(config, name, mesh) -> dict:
    program = layout(config, name, mesh)
    options = {}
    if args.target == "cpu":
      options["xla_cpu_scheduler_type"] = CPU_SCHEDULERS[args.cpu_scheduler]
      if args.compile_level >= 0:
        options["xla_backend_optimization_level"] = args.compile_level
    step = jax.jit(program.fn, in_shardings=program.in_shardings,
                   out_shardings=program.out_shardings, donate_argnums=program.donate,
                   compiler_options=options or None)
    t0 = time.time()
    # Traced under the mesh, as the training loop traces it: the models' batch pins
    # (sharding.constrain_batch) see it and XLA gathers weights, not activations.
    compiled = sharding.under_mesh(lambda: step.lower(*program.args).compile(), mesh)()
    if args.dump_hlo:
      path = os.path.join(args.dump_hlo, f"{name}_n{mesh.devices.size}_d{config.model.depth}.txt")
      os.makedirs(args.dump_hlo, exist_ok=True)
      with open(path, "w") as f:
        f.write(compiled.as_text())
    mem = compiled.memory_analysis()
    row = from_shapes(program)
    row.update(args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
               total=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
               seconds=time.time() - t0, depth=config.model.depth)
    return row

  def show(n, name, mesh_name, row, note=""):
    fits = "yes" if row["total"] <= args.hbm_gib * GiB else "NO"
    compile_s = f"{row['seconds']:5.0f} s" if "seconds" in row else note
    line = (f"{n:>4} {name:<13} {row['depth']:>5} {mesh_name:>6} {row['weights'] / GiB:8.2f} "
            f"{row['optim'] / GiB:7.2f} {row['args'] / GiB:7.2f} {row['temp'] / GiB:7.2f} "
            f"{row['total'] / GiB:7.2f}  {fits:<12} {compile_s}")
    rows.append(line)
    print(line, flush=True)

  rows = []
  for n in args.device_counts:
    devices = _devices(args.target, n, jax)
    data, fsdp = (1, n) if args.mesh == "fsdp" else (max(n // 8, 1), min(n, 8))
    mesh = sharding.make_mesh(data, fsdp, devices=devices)
    sharding.check_batch_size(args.batch, mesh, "--batch")
    for name in args.stages.split(","):
      if not depths:
        show(n, name, f"{data}x{fsdp}", compile_one(full, name, mesh))
        continue
      measured = []
      for d in depths:
        measured.append(compile_one(build_config(d), name, mesh))
        show(n, name, f"{data}x{fsdp}", measured[-1])
      (d0, t0), (d1, t1) = [(m["depth"], m["temp"]) for m in (measured[0], measured[-1])]
      slope = (t1 - t0) / (d1 - d0)
      row = from_shapes(layout(full, name, mesh))
      row.update(depth=full.model.depth, temp=t1 + slope * (full.model.depth - d1))
      row["total"] = row["args"] + row["temp"]
      show(n, name, f"{data}x{fsdp}", row, note="extrapolated")
  return rows


def _sana_config(args, depth: int = 0):
  """experiments/mjhq_sana.py at args.sana with every batch args.batch; depth > 0 cuts the
  network to that many blocks (the discriminator then reads the blocks that remain)."""
  from experiments import mjhq_sana  # pylint: disable=g-import-not-at-top
  c = mjhq_sana.get_config(args.sana)
  for stage in (c.teacher, c.trajectory, c.distribution):
    stage.batch_size = args.batch
  if depth:
    c.model.feature_layers = tuple(i for i in c.model.feature_layers if i < depth) or (depth - 1,)
    c.model.depth = depth
  return c


def _devices(target: str, n: int, jax):
  if target == "cpu":
    return jax.devices()[:n]
  if n not in V5E_TOPOLOGIES:
    raise ValueError(f"--devices: no v5e slice of {n} chips; choose from "
                     f"{sorted(V5E_TOPOLOGIES)}.")
  from hierdistill.planning import chips  # pylint: disable=g-import-not-at-top
  return chips.slice_devices(V5E_TOPOLOGIES[n])


if __name__ == "__main__":
  main()
