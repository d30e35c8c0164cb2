"""The TPU plans of the paper's runs: every program of each run compiled by the TPU compiler at
full depth for real slices (launch/plan.py), collected into the tables of benchmarks/README.md.

  pip install -e ".[tpu]"
  python benchmarks/tpu_table.py --list                 # the plans and which are done
  python benchmarks/tpu_table.py                        # compile what is missing, then the table
  python benchmarks/tpu_table.py --only=fit             # the plans whose name contains 'fit'
  python benchmarks/tpu_table.py --table                # the table from what is done
  python benchmarks/tpu_table.py --only=fit --redo      # recompile after a config change

Each (plan, program) is one `launch/plan.py --programs=<program> --json=...` process, and its
row is kept in benchmarks/tpu_plans.json as soon as it is done: a full-depth program takes
minutes to tens of minutes to compile on a 2-core host, so the work spans sessions and a rerun
only compiles what is missing. Every figure is the compiler's (memory: its plan; times and
utilisation: its estimates), never a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "tpu_plans.json")
GiB = 2 ** 30
PROGRAMS = ("trajectory", "distribution", "sampler", "generator")
ENCODER = "encoder"  # SANA's Gemma-2-2B on one chip (extraction, the eval's prompts)

IMAGENET = {"SiT-XL/2": "experiments/imagenet256.py",
            "LightningDiT-XL/1": "experiments/imagenet256.py:lightningdit",
            "DiT-XL/2": "experiments/imagenet256.py:dit"}
SANA = {f"SANA-{size} {px} px": f"experiments/mjhq_sana.py:{size},{px}"
        for size in ("0.6B", "1.6B") for px in ("512", "1024")}

# The levers that make each run fit its smallest slice with >= 15% headroom (README: "Planning
# a TPU slice"); the global batch stays the config's (256). A program's rows depend only on the
# levers that reach it (key_of).
_BF16 = "--config.frozen_param_dtype=bfloat16"
_SCAN = "--config.model.scan_blocks=True"
LEVERS = {
    "SiT-XL/2": (_BF16, "--config.trajectory.microbatches=4",
                 "--config.distribution.microbatches=4"),
    # Stage 2 at 4 micro-batches left LightningDiT-XL/1 14.9% headroom (13.61 GiB), and the
    # optimiser states on the host made it worse at full depth (13.96 GiB): 8 micro-batches.
    "LightningDiT-XL/1": (_BF16, "--config.trajectory.microbatches=4",
                          "--config.distribution.microbatches=8"),
    "DiT-XL/2": (_BF16, "--config.trajectory.microbatches=4",
                 "--config.distribution.microbatches=8"),
    "SANA": (_BF16, "--config.trajectory.microbatches=16", "--config.distribution.microbatches=16"),
}


# Plans compiled before mjhq_sana.py's sharding_rules kept SANA's depthwise kernels whole, kept
# as they were (unrolled, each program takes 15-45 minutes and up to 38 GiB of host memory
# here); the "scan fit" plans are the config as it is. The table says so in their levers.
BEFORE_DEPTHWISE_RULE = ("fit SANA-0.6B 1024 px v5e:2x4", "fit SANA-1.6B 1024 px v5e:4x4",
                         "fit SANA-1.6B 1024 px v6e:2x4")

# plans() names read "<kind> <run> <slice>"; the table's run column drops the kind.
PREFIXES = ("fit ", "fsdp 256 ", "util remat off ", "util ", "before levers ", "micro 4 ",
            "optim on host ", "scan fit ", "scan at micro 8 ", "scan no levers ",
            "scan bf16 only ", "scan ")


def plans() -> list:
  """(name, config, topology, overrides): the table of the paper's runs on 64- and 256-chip
  slices as configured but for scanned blocks, then the smallest slices with the levers, then
  the utilisation plan."""
  out = []
  # The pod table compiles the blocks scanned: the same program but for its layout, and the
  # full-depth compile takes minutes instead of tens of minutes (the "scan" plan below holds
  # the difference in memory on the smallest slice).
  for label, config in IMAGENET.items():
    for topology in ("v5e:8x8", "v5p:4x4x4", "v6e:8x8"):
      out.append((f"{label} {topology}", config, topology, (_SCAN,)))
  for label, config in SANA.items():
    for topology in ("v5e:16x16", "v5p:4x4x4", "v6e:8x8"):
      out.append((f"{label} {topology}", config, topology, (_SCAN,)))
  # SANA on 256 chips with the whole slice as one fsdp axis (its config's mesh before the
  # hybrid one): 256 divides none of SANA's widths, so every weight stays whole on every chip.
  out.append(("fsdp 256 SANA-0.6B 512 px v5e:16x16", SANA["SANA-0.6B 512 px"], "v5e:16x16",
              (_SCAN, "--config.mesh.data=1", "--config.mesh.fsdp=-1")))
  # The one pod program compiled with its blocks unrolled, beside its scanned row.
  out.append(("SiT-XL/2 unrolled v5p:4x4x4", IMAGENET["SiT-XL/2"], "v5p:4x4x4", ()))
  for label, config in IMAGENET.items():
    out.append((f"fit {label} v5e:2x2", config, "v5e:2x2", LEVERS[label]))
  out.append(("fit SANA-0.6B 1024 px v5e:2x4", SANA["SANA-0.6B 1024 px"], "v5e:2x4",
              LEVERS["SANA"]))
  for topology in ("v5e:4x4", "v6e:2x4"):
    out.append((f"fit SANA-1.6B 1024 px {topology}", SANA["SANA-1.6B 1024 px"], topology,
                LEVERS["SANA"]))
  # What the levers bought on the smallest ImageNet slice: none; LightningDiT-XL/1's stage 2 at
  # 4 micro-batches (14.9% headroom: why its fit takes 8).
  out.append(("before levers SiT-XL/2 v5e:2x2", IMAGENET["SiT-XL/2"], "v5e:2x2", ()))
  out.append(("micro 4 LightningDiT-XL/1 v5e:2x2", IMAGENET["LightningDiT-XL/1"], "v5e:2x2",
              LEVERS["SiT-XL/2"]))
  # The same with stage 2's optimiser states on the host: its arguments lose the 2.53 GiB of
  # states, its temporaries gain more (the compiler unrolls the critic loop that carries them).
  out.append(("optim on host LightningDiT-XL/1 v5e:2x2", IMAGENET["LightningDiT-XL/1"],
              "v5e:2x2",
              LEVERS["SiT-XL/2"] + ("--config.distribution.offload_optimizer_state=True",)))
  # The blocks scanned (model.scan_blocks): one block body in a loop instead of 28 copies of it,
  # the same fit plan otherwise: what it does to memory, and to the time to compile.
  out.append(("scan SiT-XL/2 v5e:2x2", IMAGENET["SiT-XL/2"], "v5e:2x2",
              LEVERS["SiT-XL/2"] + (_SCAN,)))
  # What each lever buys on that slice, scanned (unrolled, stage 2 without levers needs more
  # host memory than this 24 GiB host has): none, then the bf16 teacher alone; with both and 4
  # or 8 micro-batches are the plans around these.
  out.append(("scan no levers SiT-XL/2 v5e:2x2", IMAGENET["SiT-XL/2"], "v5e:2x2", (_SCAN,)))
  out.append(("scan bf16 only SiT-XL/2 v5e:2x2", IMAGENET["SiT-XL/2"], "v5e:2x2",
              (_BF16, _SCAN)))
  # Scanned, stage 2 at 4 micro-batches keeps 12% free: at 8, as DiT-XL/2 unrolled.
  out.append(("scan at micro 8 SiT-XL/2 v5e:2x2", IMAGENET["SiT-XL/2"], "v5e:2x2",
              LEVERS["DiT-XL/2"] + (_SCAN,)))
  # SANA's fits with their blocks scanned: SANA-1.6B's stage 2 unrolled did not compile in this
  # host's memory, and scanned the 0.6B's compiles in minutes instead of 40.
  out.append(("scan fit SANA-0.6B 1024 px v5e:2x4", SANA["SANA-0.6B 1024 px"], "v5e:2x4",
              LEVERS["SANA"] + (_SCAN,)))
  for topology in ("v5e:4x4", "v6e:2x4"):
    out.append((f"scan fit SANA-1.6B 1024 px {topology}", SANA["SANA-1.6B 1024 px"], topology,
                LEVERS["SANA"] + (_SCAN,)))
  # Scanned, SANA-1.6B's fit leaves half of v5e's HBM free at 16 micro-batches: at 8 (fewer,
  # larger micro-steps) on the same 16 chips.
  out.append(("scan at micro 8 SANA-1.6B 1024 px v5e:4x4", SANA["SANA-1.6B 1024 px"], "v5e:4x4",
              (_BF16, "--config.trajectory.microbatches=8", "--config.distribution.microbatches=8",
               _SCAN)))
  # Utilisation: at 4 samples a chip (256 over 64 v5p chips) the compiler's step estimate follows
  # HBM traffic that does not shrink with the batch; 64 samples a chip (4 chips) amortise it.
  out.append(("util SiT-XL/2 v5p:2x2x1", IMAGENET["SiT-XL/2"], "v5p:2x2x1", ()))
  # 7.5 of 95 GiB there: remat's recompute (17% more FLOPs than the model's) is not needed.
  out.append(("util remat off SiT-XL/2 v5p:2x2x1", IMAGENET["SiT-XL/2"], "v5p:2x2x1",
              ("--config.model.remat=False",)))
  return out


def programs_of(config) -> tuple:
  """The programs of a plan: the two stages' steps, the samplers, and the text encoder of the
  runs that have one."""
  return PROGRAMS + ((ENCODER,) if config.startswith("experiments/mjhq_sana.py") else ())


def key_of(config, topology, overrides, program) -> str:
  """The row's key: only the overrides that reach `program` (a stage's own keys reach only its
  step; the samplers none of them), so changing one stage's lever keeps the others' rows."""
  if program == ENCODER:  # the same Gemma-2 on one chip whatever SANA's size and resolution
    kept = [o for o in overrides if o.startswith("--config.text_encoder.")]
    return "|".join((config.split(":")[0], topology, " ".join(kept), program))
  other_stages = [s for s in ("trajectory", "distribution") if s != program]
  kept = [o for o in overrides if not any(o.startswith(f"--config.{s}.") for s in other_stages)]
  if program in ("sampler", "generator"):  # they read the trained networks, never the frozen copy
    kept = [o for o in kept if not o.startswith("--config.frozen_param_dtype=")]
  return "|".join((config, topology, " ".join(kept), program))


def load() -> dict:
  if not os.path.exists(RESULTS):
    return {}
  with open(RESULTS) as f:
    return json.load(f)


def save(results: dict) -> None:
  tmp = RESULTS + ".partial"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, RESULTS)  # a killed run never leaves a torn file


def compile_one(config, topology, overrides, program, timeout_s) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "plan.py"), f"--config={config}",
           f"--topology={topology}", f"--programs={program}", f"--json={out}", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode == -9:  # SIGKILL: on a small host, the kernel's out-of-memory killer
      return {"error": "killed (SIGKILL: host memory?)", "wall_s": time.time() - t0}
    if proc.returncode not in (0, 3):  # 3: a program does not fit; its row is written
      tail = [ln for ln in proc.stderr.splitlines()
              if ln.strip() and not ln.startswith(("W0", "E0"))]
      return {"error": (tail[-1] if tail else f"exit {proc.returncode}")[:300],
              "wall_s": time.time() - t0}
    with open(out) as f:
      plan = json.load(f)
    row = {**plan["rows"][0], "mesh": plan.get("mesh")}
    row["wall_s"] = time.time() - t0
    return row


def lever_label(overrides: str) -> str:
  """'bf16, micro 4' for '--config.frozen_param_dtype=bfloat16 --config.<stage>.microbatches=4'
  ('-' for none)."""
  out = []
  for o in overrides.split():
    key, value = o.removeprefix("--config.").split("=")
    out.append("bf16 teacher" if key == "frozen_param_dtype" and value == "bfloat16"
               else f"micro {value}" if key.endswith(".microbatches")
               else "optim on host" if key.endswith(".offload_optimizer_state") and value == "True"
               else "scanned blocks" if key == "model.scan_blocks" and value == "True"
               else f"{key}={value}")
  return ", ".join(out) or "-"


def table(results: dict, only: str = "") -> str:
  lines = ["| run | slice | levers | program | params | optim | temp | total GiB / chip | HBM | "
           "headroom | step s (est.) | model TFLOP / chip | util (est.) | compile |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  seen = set()
  for name, config, topology, overrides in plans():
    if only and only not in name:
      continue
    for program in programs_of(config):
      key = key_of(config, topology, overrides, program)
      row = results.get(key)
      if row is None or key in seen:  # plans may share a program (a lever of the other stage)
        continue
      seen.add(key)
      label = next((name[len(p):] for p in PREFIXES if name.startswith(p)), name)
      label = label.rsplit(" ", 1)[0]  # the topology has its own column
      if program == ENCODER:
        label = "SANA's Gemma-2-2B"
      levers = lever_label(key_of(config, topology, overrides, program).split("|")[2])
      if name in BEFORE_DEPTHWISE_RULE and program != ENCODER:
        levers += " (depthwise kernels sharded: before the rule)"
      if "error" in row:
        what = row["error"] if row.get("does_not_fit") else f"failed: {row['error']}"
        lines.append(f"| {label} | {topology} | {levers} | {program} | {what} "
                     "| | | | | | | | | |")
        continue
      util = f"{row['utilisation']:.0%}" if row.get("utilisation") else "?"
      model = f"{row['model_flops'] / 1e12:.1f}" if row.get("model_flops") else "?"
      source = row["step_seconds_source"]
      if "scanned blocks" in levers and "loops" in source:
        # The cost analysis counts one block; scaling its bytes by the loops' factor scales the
        # bytes outside them too (the optimiser's pass over every weight): a bound, no more.
        source, util = f"{source}: at most", f">= {util}"
      elif source == "roofline":  # no estimate from the compiler: its FLOPs and bytes at the
        util = f"<= {util}"  # chip's peak and bandwidth bound the time from below
      mark = "" if source == "compiler" else f" ({source})"
      lines.append(
          f"| {label} | {topology} | {levers} | {program} | {row['params_bytes'] / GiB:.2f} | "
          f"{row['optim_bytes'] / GiB:.2f} | {row['temp_bytes'] / GiB:.2f} | "
          f"{row['total_bytes'] / GiB:.2f} | {row['hbm_bytes'] / GiB:.0f} | "
          f"{row['headroom']:.1%} | {row['step_seconds']:.3f}{mark} | {model} | {util} | "
          f"{row['seconds_to_compile']:.0f} s |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help="plans whose name contains this")
  parser.add_argument("--programs", default="", help="of " + ", ".join(PROGRAMS + (ENCODER,))
                      + " (default: each plan's own)")
  parser.add_argument("--list", action="store_true", help="list the plans and what is done")
  parser.add_argument("--table", action="store_true", help="print the table of what is done")
  parser.add_argument("--timeout_s", type=int, default=3 * 3600, help="per program")
  parser.add_argument("--redo", action="store_true",
                      help="recompile the selected rows though done: a row's key holds the "
                           "config's name and overrides, not what the config file says, so a "
                           "changed config (its mesh, its partition rules) needs this")
  args = parser.parse_args(argv)
  results = load()
  asked = args.programs.split(",") if args.programs else None
  todo = [(p, prog) for p in plans() if args.only in p[0] for prog in programs_of(p[1])
          if asked is None or prog in asked]
  if args.list:
    for (name, config, topology, overrides), program in todo:
      done = key_of(config, topology, overrides, program) in results
      print(f"{'done' if done else '    '}  {name:<40} {program}")
    return
  if not args.table:
    for (name, config, topology, overrides), program in todo:
      key = key_of(config, topology, overrides, program)
      if (not args.redo and key in results
          and ("error" not in results[key] or results[key].get("does_not_fit"))):
        continue  # done, or refused by the compiler for HBM (a finding, not a failure)
      print(f"[{time.strftime('%H:%M:%S')}] {name}: {program} ...", flush=True)
      row = compile_one(config, topology, overrides, program, args.timeout_s)
      results = load()  # another run may have added rows meanwhile
      results[key] = row
      save(results)
      done = (f"failed: {row['error']}" if "error" in row
              else f"total {row['total_bytes'] / GiB:.2f} GiB, headroom {row['headroom']:.0%}")
      print(f"    {done} ({row['wall_s']:.0f} s)", flush=True)
  print(table(results, args.only))


if __name__ == "__main__":
  main()
