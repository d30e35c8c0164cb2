"""Plan a run for a TPU slice before renting it: every program the run executes, compiled by the
TPU compiler (libtpu, the `tpu` extra) for the described slice with the config's mesh and
partition rules, and what the compiler says of each: memory per chip against the chip's HBM,
its FLOPs and step-time estimate, the model's FLOPs and the utilisation they imply.

  python launch/plan.py --config=experiments/imagenet256.py --topology=v5e:8x8

chips.py: the slices and the chips' published figures; programs.py: the programs of a run as
abstract arguments; analysis.py: compiling one and reading the compiler's figures.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

from hierdistill import config_checks
from hierdistill import sharding
from hierdistill.planning import analysis, chips, programs
from hierdistill.planning.programs import PROGRAMS, default_programs

GiB = chips.GiB


@dataclasses.dataclass
class Row:
  """One program of the plan, per device (a chip, or a core of a v4 chip)."""
  name: str
  what: str
  params_bytes: int
  optim_bytes: int
  batch_bytes: int
  compiled: analysis.Compiled
  hbm_bytes: int
  peak_flops: float  # bf16, per device
  hbm_bytes_per_s: float
  model_flops: Optional[float]  # per device; None when not counted
  # Model FLOPs over the same counted as the compiler's cost analysis counts them (a loop it
  # kept: one trip; a loop it unrolled: every trip): what its FLOPs and step-time estimate are
  # scaled by (1: no loop kept; None: not counted).
  loop_factor: Optional[float] = None
  optim_on_host: bool = False  # optim is host memory, not HBM (offload_optimizer_state)

  @property
  def headroom(self) -> float:
    """The share of the device's HBM the program leaves free (negative: it does not fit)."""
    return 1.0 - self.compiled.total_bytes / self.hbm_bytes

  @property
  def step_seconds(self) -> tuple:
    """(seconds, source): the compiler's own estimate when it gives one, else the roofline of
    its counts, max(FLOPs / peak, bytes accessed / HBM bandwidth); either scaled by the loop
    factor, since the compiler counts the body of a loop it kept once. Estimates, all of them."""
    c = self.compiled
    if c.optimal_seconds:
      seconds, source = c.optimal_seconds, "compiler"
    else:
      seconds = max(c.compiler_flops / self.peak_flops, c.bytes_accessed / self.hbm_bytes_per_s)
      source = "roofline"
    factor = self.loop_factor or 1.0
    return seconds * factor, source + (" x loops" if factor > 1.001 else "")

  def to_dict(self) -> dict:
    """The row as plain numbers (bytes, FLOPs, seconds), for JSON."""
    seconds, source = self.step_seconds
    out = {k: v for k, v in dataclasses.asdict(self).items() if k != "compiled"}
    out.update(dataclasses.asdict(self.compiled), total_bytes=self.compiled.total_bytes,
               headroom=self.headroom, step_seconds=seconds, step_seconds_source=source,
               utilisation=self.utilisation)
    return out

  @property
  def utilisation(self) -> Optional[float]:
    """Model FLOPs / (estimated step time x bf16 peak): an estimate of the MFU."""
    seconds, _ = self.step_seconds
    if not self.model_flops or not seconds:
      return None
    return self.model_flops / (seconds * self.peak_flops)


@dataclasses.dataclass
class NoFit:
  """A program the TPU compiler refused for the chip's HBM: the compiler's message instead of
  its figures."""
  name: str
  what: str
  params_bytes: int
  optim_bytes: int
  batch_bytes: int
  hbm_bytes: int
  message: str
  seconds_to_compile: float
  optim_on_host: bool = False
  headroom = float("-inf")

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "does_not_fit": True,
            "error": f"does not fit: {self.message}"}


def plan(config, topology: str, names=None, *, count_model_flops: bool = True,
         report: Optional[Callable[[Row], None]] = None) -> list:
  """Compiles the programs `names` (default: every program the configured chain runs) of
  `config` for the slice `topology` and returns a Row each (a NoFit where the compiler finds
  the program too large for the chip); `report(row)` is called as each is done (compiles of
  full-size networks take minutes)."""
  devices = chips.slice_devices(topology)
  chip = chips.chip_of(topology)
  per_chip = len(devices) // len({tuple(d.coords) for d in devices})  # v4: 2 cores, 2 devices
  mesh = sharding.make_mesh(int(config.mesh.data), int(config.mesh.fsdp), devices=devices)
  config_checks.validate_config(config)
  config_checks.check_batch_sizes(config, len(devices))
  names = tuple(names or default_programs(config))
  built = programs.build(config, mesh, names)
  no_remat = None
  if count_model_flops:
    no_remat = copy.deepcopy(config)
    with no_remat.unlocked():
      no_remat.model.remat = False
  rows = []
  for program in built:
    program_mesh = program.mesh or mesh
    try:
      compiled = analysis.compile_program(program, program_mesh)
    except analysis.DoesNotFit as e:
      rows.append(NoFit(name=program.name, what=program.what, params_bytes=program.params_bytes,
                        optim_bytes=program.optim_bytes, batch_bytes=program.batch_bytes,
                        hbm_bytes=chip.hbm_bytes // per_chip, message=e.message,
                        seconds_to_compile=e.seconds_to_compile,
                        optim_on_host=program.optim_on_host))
      if report:
        report(rows[-1])
      continue
    flops = factor = None
    if no_remat is not None:
      (plain,) = programs.build(no_remat, mesh, (program.name,))
      total, counted = analysis.model_flops(plain, compiled.loop_trip_counts)
      flops, factor = total / program_mesh.devices.size, (total / counted if counted else 1.0)
    row = Row(name=program.name, what=program.what, params_bytes=program.params_bytes,
              optim_bytes=program.optim_bytes, batch_bytes=program.batch_bytes,
              compiled=compiled, hbm_bytes=chip.hbm_bytes // per_chip,
              peak_flops=chip.peak_bf16_flops / per_chip,
              hbm_bytes_per_s=chip.hbm_bytes_per_s / per_chip, model_flops=flops,
              loop_factor=factor, optim_on_host=program.optim_on_host)
    rows.append(row)
    if report:
      report(row)
  return rows


_SHORT = {"all-gather": "ag", "all-reduce": "ar", "reduce-scatter": "rs", "all-to-all": "aa",
          "collective-permute": "cp"}
HEADER = (f"{'program':<13} {'params':>7} {'optim':>6} {'batch':>6} {'temp':>6} {'total':>6} "
          f"{'HBM':>5} {'headroom':>8}  {'TFLOP':>7} {'step s':>8} {'model':>7} {'util':>5}  "
          f"{'collectives GiB':<28} {'compile':>7}")


def _optim(row) -> str:
  """The optimiser state's GiB, marked h where it lives in host memory."""
  return f"{row.optim_bytes / GiB:5.2f}h" if row.optim_on_host else f"{row.optim_bytes / GiB:6.2f}"


def format_row(row) -> str:
  """One line of the plan's table: GiB per device, TFLOP per device, estimates marked."""
  if isinstance(row, NoFit):
    return (f"{row.name:<13} {row.params_bytes / GiB:7.2f} {_optim(row)} "
            f"{row.batch_bytes / GiB:6.2f}  does NOT fit (the compiler: {row.message})  "
            f"{row.seconds_to_compile:6.0f}s")
  c = row.compiled
  seconds, source = row.step_seconds
  mark = ("" if source.startswith("compiler") else "r") + ("*" if "loops" in source else "")
  util = f"{row.utilisation:5.0%}" if row.utilisation is not None else "    ?"
  model = f"{row.model_flops / 1e12:7.2f}" if row.model_flops else "      ?"
  coll = " ".join(f"{_SHORT[k]}={v / GiB:.2f}"
                  for k, v in sorted(c.collective_bytes.items())) or "-"
  return (f"{row.name:<13} {row.params_bytes / GiB:7.2f} {_optim(row)} "
          f"{row.batch_bytes / GiB:6.2f} {c.temp_bytes / GiB:6.2f} {c.total_bytes / GiB:6.2f} "
          f"{row.hbm_bytes / GiB:5.0f} {row.headroom:8.0%}  {c.compiler_flops / 1e12:7.2f} "
          f"{seconds:7.3f}{mark:2} {model} {util}  {coll:<28} {c.seconds_to_compile:6.0f}s")


LEGEND = (
    "Per device (a chip; a TensorCore on v4), GiB: params = every network's weights, EMA and the "
    "frozen teacher; optim = optimiser states\n(both from shapes and the partition rules; h: "
    "in host memory, not counted in total); batch "
    "= the step's inputs; temp = the compiler's temporaries; total = the compiled program's peak\n"
    "(inputs + outputs - donated + temp), against the chip's HBM. TFLOP = the compiler's FLOPs "
    "(remat's recomputation included, the body of a\nloop it kept counted once); step s = the "
    "compiler's own step-time estimate, or, marked r, the roofline of its counts (max of\nFLOPs "
    "/ peak, bytes / HBM bandwidth), marked * when scaled by the loops' trip counts (model FLOPs "
    "over model FLOPs counted\nas the compiler counts them); model = the model's TFLOP (matmuls "
    "and convolutions of the step's math, no remat); util = model / (step s x bf16\npeak). "
    "Estimates, never measurements. collectives: GiB of results of each all-gather (ag), "
    "all-reduce (ar),\nreduce-scatter (rs), all-to-all (aa), collective-permute (cp) as written "
    "in the program (a loop body counted once).")

__all__ = ["PROGRAMS", "Row", "NoFit", "plan", "format_row", "HEADER", "LEGEND", "chips"]
