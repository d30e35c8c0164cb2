"""Plans a run for a TPU slice before it is rented: every program the run executes, compiled by
the TPU compiler for that slice, with memory per chip and the compiler's step-time estimate.

  pip install -e ".[tpu]"      # libtpu: compiles for any slice on any host, no TPU needed
  python launch/plan.py --config=experiments/imagenet256.py --topology=v5e:8x8
  python launch/plan.py --config=experiments/mjhq_sana.py:1.6B,1024 --topology=v5e:4x4 \\
      --config.distribution.microbatches=4 --config.frozen_param_dtype=bfloat16
  python launch/plan.py --config=experiments/digits.py:tiny --topology=v5e:2x2 \\
      --config.mesh.data=2 --config.mesh.fsdp=2 --programs=teacher,trajectory

Flags:
  --config=FILE[:ARG]   the experiment, with any --config.a.b=V override (as launch/main.py)
  --topology=NAME       a libtpu slice: <v4|v5e|v5p|v6e>:<shape>, e.g. v5e:2x2, v5p:4x4x4
  --programs=a,b        of teacher, trajectory, distribution, sampler, generator, encoder
                        (default: the configured stages' steps, both samplers, and the frozen
                        text encoder where the run has one: SANA's Gemma-2 on one chip)
  --model_flops         count the model's FLOPs (a trace without remat; default on)
  --json=FILE           also write the rows (bytes, FLOPs, seconds) as JSON

Every figure is the TPU compiler's plan (memory) or estimate (times, utilisation) for a slice
that was never run. Exit status 2 with one line for a mistake in the command or config, or when
libtpu is missing; 3 when a program does not fit the slice (its rows are printed and written).
Full-size programs take minutes each to compile on a small host.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# This host runs nothing: libtpu only compiles. JAX must not try to start a TPU backend.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/imagenet256.py[:arg].",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "libtpu slice, e.g. v5e:8x8 or v5p:4x4x4.")
_PROGRAMS = flags.DEFINE_list("programs", None, "Programs to compile (default: all the run's).")
_MODEL_FLOPS = flags.DEFINE_bool("model_flops", True, "Count the model's FLOPs.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  import jax  # noqa: F401  pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  from hierdistill import planning  # pylint: disable=g-import-not-at-top
  from hierdistill import sharding  # pylint: disable=g-import-not-at-top
  from hierdistill.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  names = _PROGRAMS.value
  if names:
    unknown = [n for n in names if n not in planning.PROGRAMS]
    if unknown:
      print(f"error: --programs: unknown program {unknown[0]!r}; choose from "
            f"{', '.join(planning.PROGRAMS)}.", file=sys.stderr)
      sys.exit(2)
  try:
    chip = planning.chips.chip_of(_TOPOLOGY.value)
    n = len(planning.chips.slice_devices(_TOPOLOGY.value))
    data, fsdp = sharding.mesh_shape(int(config.mesh.data), int(config.mesh.fsdp), n)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  micro = ", ".join(str(getattr(config, s).get("microbatches", 1))
                    for s in ("teacher", "trajectory", "distribution"))
  offloaded = ", ".join(s for s in ("teacher", "trajectory", "distribution")
                        if getattr(config, s).get("offload_optimizer_state", False))
  print(f"{config.name} on {_TOPOLOGY.value} ({chip.name}: {chip.hbm_bytes / 2**30:.0f} GiB HBM, "
        f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 a chip; {planning.chips.SOURCE}), mesh "
        f"data {data} x fsdp {fsdp} (config data={config.mesh.data} fsdp={config.mesh.fsdp}), "
        f"frozen teacher "
        f"{config.get('frozen_param_dtype', 'float32')}, remat "
        f"{config.model.get('remat', False)} ({config.model.get('remat_policy', '-')}), "
        f"micro-batches {micro} (teacher, stage 1, stage 2), optimiser state on the host: "
        f"{offloaded or 'none'}", flush=True)
  print(planning.LEGEND)
  print("\n" + planning.HEADER)
  t0 = time.time()

  def report(row):
    print(planning.format_row(row) + f"   {row.what}", flush=True)

  try:
    rows = planning.plan(config, _TOPOLOGY.value, names,
                         count_model_flops=_MODEL_FLOPS.value, report=report)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    import json  # pylint: disable=g-import-not-at-top
    with open(_JSON.value, "w") as f:
      json.dump({"topology": _TOPOLOGY.value, "config": config.name, "mesh": [data, fsdp],
                 "rows": [r.to_dict() for r in rows]}, f, indent=1)
  worst = min(rows, key=lambda r: r.headroom)
  if isinstance(worst, planning.NoFit):
    print(f"\n{worst.name} does NOT fit {_TOPOLOGY.value}: {worst.message}; planned in "
          f"{time.time() - t0:.0f} s")
    sys.exit(3)
  print(f"\nlargest: {worst.name}, {worst.compiled.total_bytes / 2**30:.2f} of "
        f"{worst.hbm_bytes / 2**30:.0f} GiB ({worst.headroom:.0%} headroom); "
        f"{'fits' if worst.headroom >= 0 else 'does NOT fit'}; planned in {time.time() - t0:.0f} s")
  if worst.headroom < 0:
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)
