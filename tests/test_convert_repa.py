"""REPA's SiT-XL/2 (sihyun-yu/REPA) through convert/dit.py with kind='repa'.

REPA's linear path is ours (t = 1 noise, velocity e - x, t embedded as is), its final layer has
no learn_sigma half, and its checkpoint carries the alignment projectors, which the importer
checks and drops. Against tests/torch_reference/repa_sit.py (a restatement of REPA's
models/sit.py) with random weights: v(z, t | y) == REPASiT(z, t, y)[0].
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import imagenet256
from hierdistill.config_checks import validate_config
from hierdistill.convert import dit as convert_dit
from hierdistill.models import DiT
from tests.torch_reference import training_files

TINY = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=4,
            num_classes=10, out_channels=4, **convert_dit.MODEL_FIELDS["repa"])
TORCH_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3,
                  num_heads=4, num_classes=10, z_dims=(24, 16), projector_dim=40,
                  encoder_depth=2)

# REPA's SiT-XL/2: DiT-XL/2 without the learn_sigma half of the final layer (pos_embed
# included), and one projector 1152 -> 2048 -> 2048 -> 768 (DINOv2-B, encoder_depth 8).
XL2_NETWORK = 675_129_632 - (1152 + 1) * 2 * 2 * 4
XL2_PROJECTOR = (1152 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 768 + 768)


def test_layout_param_count_and_config_variant():
  layout = convert_dit.published_layout(depth=28, hidden_size=1152, patch_size=2, in_channels=4,
                                        out_channels=4, num_classes=1000, input_size=32)
  assert convert_dit.param_count(layout) == XL2_NETWORK == 675_111_184
  assert XL2_PROJECTOR == 8_131_328
  c = imagenet256.get_config("repa")
  validate_config(c)
  assert c.teacher.checkpoint_kind == "repa" and c.model.out_channels == 4
  for k, v in convert_dit.MODEL_FIELDS["repa"].items():
    assert c.model[k] == v
  # REPA's README: cfg 1.8 with guidance only for t <= 0.7 (its t, which is ours), all
  # channels guided (its sampler has no forward_with_cfg channel split).
  assert c.sample.cfg_scale == 1.8 and tuple(c.sample.cfg_interval) == (0.0, 0.7)
  assert c.sample.guided_channels is None and c.eval.teacher_steps == (250,)


def _state_dict(seed=0, **kw):
  torch = pytest.importorskip("torch")
  from tests.torch_reference.repa_sit import REPASiT
  torch.manual_seed(seed)
  ref = REPASiT(**{**TORCH_TINY, **kw}).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name != "pos_embed":
        p.copy_(0.2 * torch.randn_like(p))
  return torch, ref


@pytest.mark.torch
def test_reference_xl2_layout_is_sit_without_sigma_plus_projectors():
  torch = pytest.importorskip("torch")
  from tests.torch_reference.repa_sit import REPASiT
  with torch.device("meta"):
    ref = REPASiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                  num_heads=16, num_classes=1000)
  got = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  net = {k: s for k, s in got.items() if not k.startswith("projectors.")}
  assert net == convert_dit.published_layout(depth=28, hidden_size=1152, patch_size=2,
                                             in_channels=4, out_channels=4, num_classes=1000,
                                             input_size=32)
  assert sum(np.prod(s) for k, s in got.items() if k.startswith("projectors.")) == XL2_PROJECTOR


@pytest.mark.torch
@pytest.mark.parametrize("wrapped", [False, True])
def test_repa_import_matches_reference_velocity(tmp_path, wrapped):
  torch, ref = _state_dict()
  path = str(tmp_path / "last.pt")
  sd = ref.state_dict()
  # last.pt is a bare state dict; REPA's train.py saves {'model', 'ema', 'opt', ...}.
  torch.save(training_files.dit_style(torch, sd, steps=7) if wrapped else sd, path)
  model = DiT(**TINY)
  params = convert_dit.load_dit_checkpoint(path, model, kind="repa")
  rng = np.random.default_rng(1)
  z = rng.standard_normal((5, 8, 8, 4)).astype(np.float32)
  t = np.array([0.0, 0.3, 0.5, 0.97, 1.0], np.float32)
  y = np.array([0, 3, 10, 9, 10], np.int32)  # 10 = the null label
  ours = jax.jit(lambda p, z, t, y: model.apply({"params": p}, z, None, t, y))(params, z, t, y)
  with torch.no_grad():
    out, zs = ref(torch.from_numpy(z).permute(0, 3, 1, 2), torch.from_numpy(t),
                  torch.from_numpy(y).long())
  assert [tuple(a.shape) for a in zs] == [(5, 16, 24), (5, 16, 16)]  # dropped, not read
  want = out.numpy().transpose(0, 2, 3, 1)
  assert float(np.std(want)) > 0.1
  np.testing.assert_allclose(np.asarray(ours), want, atol=2e-5 * float(np.abs(want).max()),
                             rtol=1e-4)
  # Every param filled, nothing of the projectors kept.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), None,
                          jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  projector_size = sum(v.numel() for k, v in sd.items() if k.startswith("projectors."))
  assert (sum(a.size for a in jax.tree.leaves(params)) + 16 * 32 + projector_size
          == sum(v.numel() for v in sd.values()))


def _numpy_state_dict(**kw):
  layout = convert_dit.published_layout(depth=3, hidden_size=32, patch_size=2, in_channels=4,
                                        out_channels=4, num_classes=10, input_size=8)
  from hierdistill.models.dit import sincos_pos_embed_2d
  sd = {k: np.zeros(s, np.float32) for k, s in layout.items()}
  sd["pos_embed"] = sincos_pos_embed_2d(32, 4)[None]
  for layer, shape in (("0", (40, 32)), ("2", (40, 40)), ("4", (24, 40))):
    sd[f"projectors.0.{layer}.weight"] = np.zeros(shape, np.float32)
    sd[f"projectors.0.{layer}.bias"] = np.zeros(shape[:1], np.float32)
  sd.update(kw)
  return sd


def test_wrong_files_are_one_line_naming_the_key_and_where_published():
  model = DiT(**TINY)
  convert_dit.import_dit(_numpy_state_dict(), model, kind="repa")  # the good one imports
  bad = _numpy_state_dict(**{"projectors.0.0.weight": np.zeros((40, 33), np.float32)})
  with pytest.raises(ValueError, match=r"projectors\.0\.0\.weight has shape \(40, 33\).*"
                     r"in last\.pt.*sihyun-yu/REPA"):
    convert_dit.import_dit(bad, model, kind="repa", path="last.pt")
  bad = _numpy_state_dict(**{"projectors.0.1.weight": np.zeros((3,), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 'projectors\.0\.1\.weight'"):
    convert_dit.import_dit(bad, model, kind="repa", path="last.pt")
  # A REPA file read as SiT: the projectors are not dropped silently.
  sit = DiT(**{**TINY, **convert_dit.MODEL_FIELDS["sit"]})
  with pytest.raises(ValueError, match=r"unexpected key 'projectors\.0\..*checkpoint_kind='repa'"):
    convert_dit.import_dit(_numpy_state_dict(), sit, kind="sit", path="last.pt")
  # A SiT file read as REPA.
  sd = {k: v for k, v in _numpy_state_dict().items() if not k.startswith("projectors.")}
  with pytest.raises(ValueError, match="no projectors.* keys: not a REPA checkpoint"):
    convert_dit.import_dit(sd, model, kind="repa", path="SiT-XL-2-256x256.pt")
  with pytest.raises(ValueError, match=r"config\.model\.time_flip=True but a REPA checkpoint "
                     "needs False"):
    convert_dit.check_model_fields(sit, "repa")
