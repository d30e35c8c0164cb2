"""TPU slices a run can be planned for: the devices of a described slice, and each chip's
published HBM, bf16 peak and HBM bandwidth.

No TPU is needed: libtpu (the `tpu` extra) describes any slice it knows by its topology name,
e.g. 'v5e:8x8' (64 chips), 'v5p:4x4x4' (64), 'v6e:2x4' (8), 'v4:2x2x2' (8), and compiles for it
on any host.

Published figures per chip (Google Cloud TPU documentation, the system-architecture page of
each version: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
  v4   32 GiB HBM2,  275 TFLOP/s bf16, 1,228 GB/s
  v5e  16 GiB HBM2,  197 TFLOP/s bf16,   819 GB/s
  v5p  95 GiB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s
  v6e  32 GiB HBM,   918 TFLOP/s bf16, 1,640 GB/s
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

from hierdistill.config_checks import ConfigError

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_bf16_flops: float  # per second
  hbm_bytes_per_s: float


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9),
}
SOURCE = "Google Cloud TPU docs, system architecture of v4 / v5e / v5p / v6e"


def chip_of(topology: str) -> Chip:
  """The chip of a topology name 'v5e:8x8' (ConfigError naming the known versions)."""
  version = topology.split(":", 1)[0]
  if version not in CHIPS or ":" not in topology:
    raise ConfigError(f"--topology={topology!r}: give a libtpu topology name <version>:<shape> "
                      f"with version one of {', '.join(CHIPS)}, e.g. v5e:8x8 or v5p:4x4x4.")
  return CHIPS[version]


def _accelerator_type(topology: str) -> str:
  """The Cloud TPU accelerator-type name of a slice ('v5e:2x4' -> 'v5litepod-8'); v4 and v5p
  name their TensorCores, two a chip."""
  version, shape = topology.split(":", 1)
  try:
    count = math.prod(int(d) for d in shape.split("x"))
  except ValueError:
    count = 1
  return {"v4": f"v4-{2 * count}", "v5e": f"v5litepod-{count}", "v5p": f"v5p-{2 * count}",
          "v6e": f"v6e-{count}"}[version]


@functools.lru_cache(maxsize=None)
def slice_devices(topology: str) -> tuple:
  """The devices of a described TPU slice (compile-only: nothing runs on them); described once
  a process (launch/plan.py asks before planning.plan does).

  Needs libtpu: `pip install -e ".[tpu]"`. Its start-up warnings about the worker hostnames
  and accelerator type (there is no TPU here) are silenced; a second process loading libtpu at
  the same time is allowed (ALLOW_MULTIPLE_LIBTPU_LOAD), since a compile holds no TPU.
  """
  chip_of(topology)
  with _libtpu_environment(topology):
    try:
      import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise ConfigError("libtpu is not installed: planning for a TPU slice needs the TPU "
                        "compiler; install it with pip install -e \".[tpu]\".") from None
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    try:
      return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # libtpu's own words for a shape it does not know
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConfigError(f"--topology={topology!r}: libtpu does not know this slice ({first}); "
                        "give a shape of that version, e.g. v5e:2x2, v5e:4x4, v5p:2x2x2.") from None


@contextlib.contextmanager
def _libtpu_environment(topology: str):
  """What a TPU VM's metadata would tell libtpu, set only while it starts: here it keeps its
  start-up quiet (the compile target is the topology named, whatever these say). Restored
  after, so that nothing later in the process takes this host for a TPU VM (a run launched
  from it would otherwise read TPU_WORKER_HOSTNAMES as a pod's and wait for a coordinator)."""
  quiet = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # a compile holds no TPU: others may load it too
           "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
           "TPU_ACCELERATOR_TYPE": _accelerator_type(topology), "TF_CPP_MIN_LOG_LEVEL": "2"}
  saved = {k: os.environ.get(k) for k in quiet}
  for k, v in quiet.items():
    os.environ.setdefault(k, v)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
