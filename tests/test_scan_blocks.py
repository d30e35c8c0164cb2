"""model.scan_blocks: one block scanned depth times changes the layout of the params and the
shape of the compiled program, never the numbers. Every network family (the label DiT, the text
DiT, LightningDiT, SANA) gives the same velocity, features and gradients (through a JVP, as
stage 1 differentiates) as its unrolled self with the same params stacked; a train step of
every stage gives the same update; the stacked axis is never sharded; an export is written in
the published, unrolled layout.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import digits, digits_text
from hierdistill import generator, sharding
from hierdistill.models import block_stack
from hierdistill.models.dit import DiT
from hierdistill.models.lightningdit import LightningDiT
from hierdistill.models.sana import SanaTransformer
from tests import test_generator, test_levers

_KEY = jax.random.PRNGKey
_Z = jax.random.normal(_KEY(0), (2, 8, 8, 4))
_TEXT = {"embeddings": jax.random.normal(_KEY(1), (2, 5, 16)),
         "mask": jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
_COMMON = dict(hidden_size=32, depth=3, num_heads=4, interval_conditioning=True,
               feature_layers=(0, -1), remat=True)
FAMILIES = {
    "label DiT": (DiT, dict(_COMMON, input_size=8, in_channels=4, patch_size=2, num_classes=10),
                  jnp.array([1, 3])),
    "text DiT": (DiT, dict(_COMMON, input_size=8, in_channels=4, patch_size=2,
                           caption_channels=16), _TEXT),
    "LightningDiT": (LightningDiT, dict(_COMMON, input_size=8, in_channels=4, patch_size=1,
                                        num_classes=10, qk_norm=True), jnp.array([1, 3])),
    "SANA": (SanaTransformer, dict(_COMMON, in_channels=4, patch_size=1, num_heads=2,
                                   cross_num_heads=2, caption_channels=16), _TEXT),
}


def _pair(family):
  cls, fields, c = FAMILIES[family]
  unrolled, scanned = cls(**fields), cls(**fields, scan_blocks=True)
  r, t = jnp.full((2,), 0.2), jnp.full((2,), 0.7)
  params = test_levers.perturb(unrolled.init(_KEY(2), _Z, r, t, c)["params"], _KEY(3))
  return unrolled, scanned, params, (r, t, c)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_blocks_compute_what_the_unrolled_ones_do(family):
  unrolled, scanned, params, (r, t, c) = _pair(family)
  stacked = block_stack.stack_blocks(params)
  # The scanned network's own init has exactly the stacked layout.
  own = scanned.init(_KEY(2), _Z, r, t, c)["params"]
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  assert [a.shape for a in jax.tree.leaves(own)] == [a.shape for a in jax.tree.leaves(stacked)]
  v1, f1 = unrolled.apply({"params": params}, _Z, r, t, c, return_features=True)
  v2, f2 = scanned.apply({"params": stacked}, _Z, r, t, c, return_features=True)
  np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-5)
  assert len(f2) == len(f1) == 2
  for a, b in zip(f1, f2):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)

  def loss(p, model):  # a JVP inside, as the MeanFlow target takes one
    u, du = jax.jvp(lambda z: model.apply({"params": p}, z, r, t, c), (_Z,), (jnp.ones_like(_Z),))
    return jnp.sum(u ** 2) + jnp.sum(du)

  g1 = block_stack.stack_blocks(jax.grad(loss)(params, unrolled))
  g2 = jax.grad(loss)(stacked, scanned)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1["blocks"])) > 1e-2


def test_stack_and_unstack_are_inverse():
  _, _, params, _ = _pair("label DiT")
  stacked = block_stack.stack_blocks(params)
  assert "blocks_0" not in stacked and stacked["blocks"]["attn"]["qkv"]["kernel"].shape[0] == 3
  back = block_stack.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(dict(params))
  for a, b in zip(jax.tree.leaves(dict(params)), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="already stacked"):
    block_stack.stack_blocks(stacked)
  with pytest.raises(ValueError, match="no stacked"):
    block_stack.unstack_blocks(back)
  gap = {k: v for k, v in dict(params).items() if k != "blocks_1"}
  with pytest.raises(ValueError, match=r"numbered \[0, 2\]"):
    block_stack.stack_blocks(gap)


def test_the_block_axis_is_never_sharded():
  for path, shape, want in (("student/blocks/attn/qkv/kernel", (64, 32, 96), 2),
                            ("opt_state/mu/blocks/mlp/fc1/kernel", (64, 64, 32), 1),
                            ("student/blocks_3/attn/qkv/kernel", (64, 32, 96), 2),
                            ("student/x_blocks/kernel", (128, 64), 0)):
    spec = sharding._leaf_spec(path, shape, sharding.DEFAULT_RULES, 32)  # pylint: disable=protected-access
    assert spec.index("fsdp") == want, (path, spec)


def _per_block(state) -> dict:
  """Every leaf by its path, a stacked leaf split into its blocks' (blocks/... -> blocks_i/...)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = sharding.path_str(path)
    parts = name.split("/")
    if "blocks" in parts:
      at = parts.index("blocks")
      for i, block in enumerate(np.asarray(leaf)):
        out["/".join(parts[:at] + [f"blocks_{i}"] + parts[at + 1:])] = block
    else:
      out[name] = np.asarray(leaf)
  return out


def _stack_everywhere(tree):
  """Every network's params in `tree` (a train state: params, EMA, optimiser moments) stacked."""
  def unrolled(node):
    return isinstance(node, dict) and "blocks_0" in node
  return jax.tree.map(lambda node: block_stack.stack_blocks(node) if unrolled(node) else node,
                      tree, is_leaf=unrolled)


@pytest.mark.parametrize("name", test_levers.STAGES)
def test_scanned_blocks_give_the_same_update(name):
  unrolled = test_levers.tiny(remat=True)
  scanned = test_levers.tiny(remat=True, scan_blocks=True)
  ma, sa = test_levers.one_step(unrolled, name)
  mb, sb = test_levers.one_step(scanned, name, init_config=unrolled, convert=_stack_everywhere)
  for key in test_levers.COMPARED:
    if key in ma:
      np.testing.assert_allclose(mb[key], ma[key], rtol=1e-5, atol=1e-6, err_msg=key)
  a, b = _per_block(sa), _per_block(sb)
  assert sorted(a) == sorted(b) and any("blocks_1" in k for k in a)
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("experiment", ["digits", "digits_text"])
def test_a_scanned_generator_exports_the_unrolled_layout(experiment, tmp_path):
  """The export speaks the published layout (blocks_{i}; a label DiT in DiT/SiT's keys), says
  scan_blocks=False, and draws what the scanned generator draws."""
  config = {"digits": digits, "digits_text": digits_text}[experiment].get_config("tiny")
  config.model.scan_blocks = True
  gen = test_generator.random_generator(
      config, perturb=lambda p: test_levers.perturb(p, _KEY(1)))
  assert "blocks" in gen.params
  out = str(tmp_path / "export")
  os.makedirs(out)
  generator.write_export(gen, out, run_config=config, grid_size=4)
  meta = json.load(open(os.path.join(out, "config.json")))
  assert meta["model"]["fields"]["scan_blocks"] is False
  keys = set(load_file(os.path.join(out, "model.safetensors")))
  if experiment == "digits":  # DiT/SiT's published names
    assert "blocks.1.attn.qkv.weight" in keys and not any(k.startswith("blocks/") for k in keys)
  else:  # Flax paths, one block a subtree
    assert any(k.startswith("blocks_1/") for k in keys) and not any(
        k.startswith("blocks/") for k in keys)
  loaded = generator.Generator.load(out, devices=jax.devices()[:1])
  labels_or_prompts = ([1, 8] if experiment == "digits"
                       else ["a bold, upright seven", "a thin, left-leaning two"])
  np.testing.assert_allclose(loaded(_KEY(7), labels_or_prompts), gen(_KEY(7), labels_or_prompts),
                             atol=1e-5)
