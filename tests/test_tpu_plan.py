"""The TPU path: the tiny configs' train steps compiled by the TPU compiler (libtpu) for a v5e
2x2 slice with a (data, fsdp) = 2 x 2 mesh, as launch/plan.py compiles the real runs.

In CI (CI set) libtpu must be there (the test command installs the `tpu` extra): a missing one
fails. Elsewhere it skips, saying why.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits, digits_text, imagenet256, mjhq_sana
from hierdistill import planning
from hierdistill import sharding
from hierdistill.planning import programs as programs_lib
from hierdistill.text import sana_encoder, sana_prompts

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
if not HAS_LIBTPU and os.environ.get("CI"):
  raise RuntimeError("CI must test the TPU path: libtpu is missing; the test command installs "
                     "it with the tpu extra (pip install -e \".[test,torch,tpu]\").")
pytestmark = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install "
                                "-e \".[tpu]\"): the TPU compiler is not here")

STEPS = ("teacher", "trajectory", "distribution")
TOPOLOGY = "v5e:2x2"
# What a tiny step may need in temporaries, as a multiple of its (tile-padded) inputs: measured
# 6.6 to 7.4 for digits, up to ~10 for the others; a step that gathered the global batch or kept
# every activation of the k critic updates would exceed it.
TEMP_PER_INPUT = 24


def _tiny_lightningdit():
  c = imagenet256.get_config("lightningdit")
  c.model.update(input_size=4, hidden_size=32, depth=2, num_heads=2, feature_layers=(0, 1),
                 dtype="float32", remat=False)
  c.distribution.update(update_ratio=1)
  c.distribution.discriminator.update(hidden=16)
  return c


def _tiny_scanned():
  c = digits.get_config("tiny")
  c.model.update(scan_blocks=True, remat=True)  # the loop of blocks, rematerialised, on TPU
  return c


CONFIGS = {
    "digits": lambda: digits.get_config("tiny"),
    "digits, scanned blocks": _tiny_scanned,
    "digits_text": lambda: digits_text.get_config("tiny"),
    "sana": lambda: mjhq_sana.get_config("runlocal"),
    "lightningdit": _tiny_lightningdit,
}


def _config(name):
  c = CONFIGS[name]()
  c.mesh.update(data=2, fsdp=2)
  for stage in STEPS:
    getattr(c, stage).batch_size = 16
  return c


def tiled_bytes(args, shardings) -> int:
  """Per-device bytes of `args` laid out by `shardings`, each shard padded to the TPU's
  (8, 128) tiles (16 rows for 2-byte types; a scalar takes 512 bytes): the most the compiler
  may allocate for them."""
  def one(a, s):
    shape = list(s.shard_shape(tuple(a.shape)))
    item = np.dtype(a.dtype).itemsize
    if not shape:
      return 512
    shape[-1] = -(-shape[-1] // 128) * 128
    if len(shape) >= 2:
      rows = 16 if item == 2 else 8
      shape[-2] = -(-shape[-2] // rows) * rows
    return int(np.prod(shape)) * item
  return sum(jax.tree.leaves(jax.tree.map(one, args, shardings)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_steps_compile_for_a_v5e_slice_within_their_shapes(name):
  config = _config(name)
  devices = planning.chips.slice_devices(TOPOLOGY)
  assert len(devices) == 4 and devices[0].platform == "tpu"
  mesh = sharding.make_mesh(2, 2, devices=devices)
  for program in programs_lib.build(config, mesh, STEPS):
    compiled = planning.analysis.compile_program(program, mesh)
    assert compiled.compiler_flops > 0, program.name
    from_shapes = program.params_bytes + program.optim_bytes + program.batch_bytes
    padded = tiled_bytes(program.args, program.in_shardings)
    # The inputs hold what the partition rules give each device: no more than their padded
    # shards (a leaf left whole on every device would exceed it), no less than the shapes.
    assert from_shapes <= compiled.argument_bytes <= padded, (program.name, compiled)
    # The donated state comes back in place: outputs beyond it are the metrics alone.
    assert compiled.output_bytes - compiled.alias_bytes < 2 ** 20, (program.name, compiled)
    assert compiled.temp_bytes <= TEMP_PER_INPUT * padded, (program.name, compiled, padded)
    assert compiled.total_bytes < planning.chips.CHIPS["v5e"].hbm_bytes


def test_the_text_encoder_is_planned_on_one_chip_in_its_chunks(tmp_path):
  """SANA's Gemma-2 runs outside the train steps (extraction, the eval's prompts), on one chip:
  its program is laid out there, at text_encoder.batch_size prompts, over the instruction's
  tokens as the configured tokenizer counts them, or at most its bytes with no tokenizer."""
  config = mjhq_sana.get_config("runlocal")
  config.text_encoder.batch_size = 4  # of the extraction's 8
  assert programs_lib.ENCODER in programs_lib.default_programs(config)
  assert programs_lib.ENCODER not in programs_lib.default_programs(digits.get_config("tiny"))
  mesh = sharding.make_mesh(2, 2, devices=planning.chips.slice_devices(TOPOLOGY))
  (bound,) = programs_lib.build(config, mesh, (programs_lib.ENCODER,))
  tok = sana_encoder.word_tokenizer(sana_prompts.COMPLEX_HUMAN_INSTRUCTION,
                                    ("<pad>", "<eos>", "<bos>", "<unk>"))
  tok.save(str(tmp_path / "tokenizer.json"))
  config.text_encoder.tokenizer = str(tmp_path / "tokenizer.json")
  (exact,) = programs_lib.build(config, mesh, (programs_lib.ENCODER,))
  n_chi = sana_prompts.instruction_length(tok)
  assert exact.args[1].shape == (4, n_chi + 24 - 2)
  assert bound.args[1].shape[0] == 4 and bound.args[1].shape[1] > exact.args[1].shape[1]
  assert "at most" in bound.what and "at most" not in exact.what
  assert exact.mesh.devices.size == 1
  compiled = planning.analysis.compile_program(exact, exact.mesh)
  # The whole encoder on the one chip: its params and the ids, nothing sharded away.
  assert exact.params_bytes + exact.batch_bytes <= compiled.argument_bytes
  assert compiled.argument_bytes <= tiled_bytes(exact.args, exact.in_shardings)
  assert compiled.compiler_flops > 0


def test_describing_a_slice_leaves_the_environment_as_it_was(monkeypatch):
  """libtpu is quieted with a TPU VM's variables while it starts; they must not outlive that,
  or a run launched later from the same process would take this host for a pod's worker and
  wait for a coordinator (launch/main.py reads TPU_WORKER_HOSTNAMES)."""
  for key in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_SKIP_MDS_QUERY"):
    monkeypatch.delenv(key, raising=False)
  planning.chips.slice_devices.cache_clear()
  assert len(planning.chips.slice_devices(TOPOLOGY)) == 4
  assert not {"TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_SKIP_MDS_QUERY"} & set(
      os.environ)


def test_a_program_too_large_for_the_chip_is_a_finding_not_a_crash():
  """The compiler refuses a program whose temporaries exceed the chip's HBM: the planner
  reports its message in a NoFit row and goes on to the next program."""
  devices = planning.chips.slice_devices(TOPOLOGY)
  mesh = sharding.make_mesh(1, 4, devices=devices)
  replicated = sharding.replicated(mesh)
  n = 60_000  # a replicated 60000^2 float32 input (13.4 GiB) and its products: over 16 GiB

  def fn(a):
    b = jnp.sin(a)
    c = jnp.cos(a) * b
    return (b @ c.T).sum() + (jnp.exp(c) @ a.T).sum()

  big = programs_lib.Program(
      name="too_large", what="60000^2 temporaries on every chip", fn=fn,
      args=(jax.ShapeDtypeStruct((n, n), jnp.float32),), in_shardings=(replicated,),
      out_shardings=replicated, donate=())
  with pytest.raises(planning.analysis.DoesNotFit, match="exceeds available HBM"):
    planning.analysis.compile_program(big, mesh)
  try:
    planning.analysis.compile_program(big, mesh)
  except planning.analysis.DoesNotFit as e:
    row = planning.NoFit(name=big.name, what=big.what, params_bytes=0, optim_bytes=0,
                         batch_bytes=0, hbm_bytes=planning.chips.CHIPS["v5e"].hbm_bytes,
                         message=e.message, seconds_to_compile=e.seconds_to_compile)
  assert "does NOT fit" in planning.format_row(row) and row.to_dict()["does_not_fit"]


def test_optimizer_state_on_the_host_leaves_the_chips_hbm():
  """<stage>.offload_optimizer_state: the compiler takes the stage's optimiser states as host
  memory, and the chip's HBM holds that much less between steps."""
  devices = planning.chips.slice_devices(TOPOLOGY)
  mesh = sharding.make_mesh(2, 2, devices=devices)
  config = _config("digits")
  # Stage 2 moves all three optimiser states: the generator's at its update, the fake score's
  # and the discriminator's through the scan of the k critic updates.
  (before,) = programs_lib.build(config, mesh, ("distribution",))
  config.distribution.offload_optimizer_state = True
  (after,) = programs_lib.build(config, mesh, ("distribution",))
  assert after.optim_on_host and not before.optim_on_host
  on_device = planning.analysis.compile_program(before, mesh)
  on_host = planning.analysis.compile_program(after, mesh)
  assert on_host.host_bytes >= after.optim_bytes > 0, on_host
  assert on_device.argument_bytes - on_host.argument_bytes >= after.optim_bytes, (
      on_device, on_host)
  # The compiler unrolls the critic loop whose carry lives on the host (and, at this size, the
  # other one too), and its cost analysis then counts all k trips: scaled by the loops each
  # program kept, both do the same work.
  whole_step = []
  for program, compiled in ((before, on_device), (after, on_host)):
    total, counted = planning.analysis.model_flops(program, compiled.loop_trip_counts)
    whole_step.append(compiled.compiler_flops * total / counted)
  assert whole_step[1] == pytest.approx(whole_step[0], rel=0.1), whole_step
