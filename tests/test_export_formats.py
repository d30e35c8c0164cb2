"""The one-step student outside hierdistill (issue 22): the interval embedding folded into the
time embedder's bias is exact at (r, t) = (0, 1); a SiT-layout export loaded by a restatement of
SiT's models.py (written here, not imported from the project) draws the generator's one-step
images; a LightningDiT export reads back through the official layout's importer and draws the
same samples in tests/torch_reference's LightningDiT with the card's t and sign; a student asked
for two steps is refused in one line."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill import conditions as cond_lib
from hierdistill import export_formats
from hierdistill.config_checks import ConfigError
from hierdistill.generator import Generator
from hierdistill.models.dit import DiT

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.torch  # every test here reads the export with PyTorch

RUN_CONFIG = {"name": "tiny_test", "model": {"name": "dit"}}
INFO = {"experiment": "tiny_test", "stage": "distribution", "step": 7}


# -- a restatement of SiT's models.py (willisma/SiT): its module tree and key names, its forward --

class TimestepEmbedder(nn.Module):

  def __init__(self, hidden_size, frequency_embedding_size=256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                             nn.Linear(hidden_size, hidden_size))
    self.frequency_embedding_size = frequency_embedding_size

  def forward(self, t):
    half = self.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):

  def __init__(self, num_classes, hidden_size, dropout_prob):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

  def forward(self, labels):
    return self.embedding_table(labels)


class Attention(nn.Module):  # timm's, as SiT builds it (qkv_bias=True)

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
    out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):  # timm's, GELU(tanh) as SiT sets it

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), \
        nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SiTBlock(nn.Module):

  def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden_size, num_heads)
    self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

  def forward(self, x, c):
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
    return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):

  def __init__(self, hidden_size, patch_size, out_channels):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):

  def __init__(self, patch_size, in_channels, hidden_size):
    super().__init__()
    self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class SiT(nn.Module):

  def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
               num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
               learn_sigma=True):
    super().__init__()
    self.learn_sigma, self.patch_size = learn_sigma, patch_size
    self.out_channels = in_channels * 2 if learn_sigma else in_channels
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    n = (input_size // patch_size) ** 2
    self.pos_embed = nn.Parameter(torch.zeros(1, n, hidden_size), requires_grad=False)
    self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

  def unpatchify(self, x):
    c, p = self.out_channels, self.patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
    return x.reshape(x.shape[0], c, h * p, h * p)

  def forward(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    for block in self.blocks:
      x = block(x, c)
    x = self.unpatchify(self.final_layer(x, c))
    if self.learn_sigma:
      x, _ = x.chunk(2, dim=1)
    return x


# -- helpers ---------------------------------------------------------------------------------------

def _student(cls=DiT, **extra):
  """A tiny student with every param random (the interval embedder too), as a Generator."""
  kw = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
            num_classes=5, out_channels=8, time_scale=1.0, time_flip=True,
            interval_conditioning=True)
  kw.update(extra)
  model = cls(**kw)
  z, t, y = jnp.zeros((1, 8, 8, 4)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
  params = jax.jit(lambda k: model.init(k, z, t, t, y)["params"])(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: np.asarray(p, np.float32)
                        + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
  return Generator(model=model, params=params, conditions=cond_lib.Labels(5), shape=(8, 8, 4),
                   role="student", sample_config={"cfg_scale": 1.0, "teacher_steps": 4},
                   data_name="imagenet", model_config={"name": "dit"}, info=INFO,
                   devices=jax.devices()[:1])


def _one_step(gen, key, labels):
  """x = e - u(e, 0, 1 | y), unclipped, and the noise e (the generator's own draw)."""
  e = jax.random.normal(key, (len(labels),) + gen.shape, jnp.float32)
  one = jnp.ones((len(labels),))
  u = gen.model.apply({"params": gen.params}, e, 0 * one, one, jnp.asarray(labels))
  return np.asarray(e - u), np.asarray(e)


# -- tests -----------------------------------------------------------------------------------------

def test_the_folded_interval_is_exact_at_one_step():
  """The folded teacher-class network's v(e, 1 | y) is the student's u(e, 0, 1 | y)."""
  gen = _student()
  teacher, params = export_formats.fold_interval(gen.model, gen.params)
  assert not teacher.interval_conditioning and "interval_embedder" not in params
  e = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 4))
  one, y = jnp.ones((3,)), jnp.array([0, 2, 4])
  u = gen.model.apply({"params": gen.params}, e, 0 * one, one, y)
  v = teacher.apply({"params": params}, e, None, one, y)
  assert float(jnp.max(jnp.abs(u - v))) < 1e-5
  # Elsewhere it is not the student (which is why other step counts are refused).
  u_half = gen.model.apply({"params": gen.params}, e, 0.5 * one, one, y)
  assert float(jnp.max(jnp.abs(u_half - v))) > 1e-3


def test_sit_export_draws_the_same_one_step_images_in_sits_own_code(tmp_path):
  gen = _student()
  out = str(tmp_path / "student")
  os.makedirs(out)
  meta = export_formats.write(gen, out, "sit", run_config=RUN_CONFIG, name="student")
  assert sorted(os.listdir(out)) == ["README.md", "export.json", "model.pt"]
  assert meta["one_step"] == {"t": 0.0, "sign": "+", "sample": "x = z + model(z, t, y)[:, :4]"}
  card = open(os.path.join(out, "README.md")).read()
  assert '"student/model.pt"' in card and "torch.full((n,), 0.0)" in card
  assert str(tmp_path) not in card and "tiny_test" in card

  # SiT's own loading: the class from the card's arguments, torch.load, strict load_state_dict.
  sit = SiT(**meta["constructor"])
  sit.load_state_dict(torch.load(os.path.join(out, "model.pt"), map_location="cpu"))
  sit.eval()
  key, labels = jax.random.PRNGKey(3), [0, 1, 4]
  want, e = _one_step(gen, key, labels)
  z = torch.from_numpy(e.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    x = z + sit(z, torch.full((3,), meta["one_step"]["t"]), torch.tensor(labels))[:, :4]
  x = x.numpy().transpose(0, 2, 3, 1)
  err = float(np.max(np.abs(x - want)))
  print(f"sit round-trip max abs error (one-step samples): {err:.3g}")
  assert err < 1e-4
  np.testing.assert_allclose(gen(key, labels), np.clip(x, -1, 1), atol=1e-4)

  # The reverse: the file is a teacher checkpoint of kind 'sit' (config.teacher.init_checkpoint),
  # whose import is the folded student exactly.
  import ml_collections
  from hierdistill.convert import from_config
  config = ml_collections.ConfigDict({"model": {"name": "dit"}, "teacher": {
      "init_checkpoint": os.path.join(out, "model.pt"), "checkpoint_kind": "sit"}})
  teacher, folded = export_formats.fold_interval(gen.model, gen.params)
  imported = from_config.load_teacher(config, teacher)
  for path, value in jax.tree_util.tree_flatten_with_path(folded)[0]:
    got = imported
    for k in path:
      got = got[k.key]
    np.testing.assert_array_equal(got, np.asarray(value), err_msg=jax.tree_util.keystr(path))


def test_lightningdit_export_reads_back_through_the_official_layout(tmp_path):
  from hierdistill.convert import lightningdit as convert_lightningdit
  from hierdistill.models.lightningdit import LightningDiT
  gen = _student(LightningDiT, in_channels=4, out_channels=4)
  out = str(tmp_path / "ld")
  os.makedirs(out)
  meta = export_formats.write(gen, out, "lightningdit", run_config=RUN_CONFIG, name="ld")
  state = {k: v.numpy() for k, v in torch.load(os.path.join(out, "model.pt")).items()}
  assert set(state) == set(convert_lightningdit.layout_of_model(gen.model.clone(
      interval_conditioning=False)))
  teacher = gen.model.clone(interval_conditioning=False)
  params = convert_lightningdit.import_lightningdit(state, teacher)
  key, labels = jax.random.PRNGKey(4), [1, 3]
  want, e = _one_step(gen, key, labels)
  one = jnp.ones((2,))
  x = e - np.asarray(teacher.apply({"params": params}, jnp.asarray(e), None, one,
                                   jnp.asarray(labels)))
  err = float(np.max(np.abs(x - want)))
  print(f"lightningdit round-trip max abs error (one-step samples): {err:.3g}")
  assert err < 1e-4 and meta["constructor"]["use_rope"] is True
  # And in PyTorch: the importer tests' restatement of LightningDiT's models file, with the
  # card's t and sign.
  from tests.torch_reference.lightningdit import LightningDiT as TorchLightningDiT
  args = meta["constructor"]
  ref = TorchLightningDiT(**{k: args[k] for k in ("input_size", "patch_size", "in_channels",
                                                  "hidden_size", "depth", "num_heads",
                                                  "mlp_ratio", "num_classes", "use_rope")})
  ref.load_state_dict(torch.load(os.path.join(out, "model.pt")))
  z = torch.from_numpy(e.transpose(0, 3, 1, 2).copy())
  assert meta["one_step"]["sign"] == "+"
  with torch.no_grad():
    x = (z + ref(z, torch.full((2,), meta["one_step"]["t"]), torch.tensor(labels))).numpy()
  err = float(np.max(np.abs(x.transpose(0, 2, 3, 1) - want)))
  print(f"lightningdit in PyTorch max abs error (one-step samples): {err:.3g}")
  assert err < 1e-4


def test_two_steps_or_a_wrong_network_are_refused_in_one_line(tmp_path):
  gen = _student()
  cases = [("sit", 2, r"--num_steps=2: the student's interval embedding is folded"),
           ("diffusers", 1, r"--format=diffusers holds a SanaTransformer .* use --format=sit"),
           ("lightningdit", 1, r"use --format=sit or dit"),
           ("onnx", 1, r"--format=onnx: choose one of")]
  for fmt, steps, message in cases:
    with pytest.raises(ConfigError, match=message) as info:
      export_formats.write(gen, str(tmp_path), fmt, run_config=RUN_CONFIG, name="x",
                           num_steps=steps)
    assert "\n" not in str(info.value)
  assert os.listdir(tmp_path) == []
  # A hierdistill export keeps every step count.
  export_formats.check_request(gen, "hierdistill", 4)


def test_dit_export_is_the_same_keys_with_dits_card(tmp_path):
  gen = _student(time_scale=1000.0, time_flip=False)  # a student of a DiT teacher embeds 1000 t
  out = str(tmp_path / "d")
  os.makedirs(out)
  meta = export_formats.write(gen, out, "dit", run_config=RUN_CONFIG, name="d")
  assert meta["one_step"]["t"] == 1000.0 and meta["one_step"]["sign"] == "-"
  assert "from models import DiT" in open(os.path.join(out, "README.md")).read()
  sit = SiT(**meta["constructor"])  # DiT's module tree is SiT's
  sit.load_state_dict(torch.load(os.path.join(out, "model.pt")))
  key, labels = jax.random.PRNGKey(5), [2]
  want, e = _one_step(gen, key, labels)
  z = torch.from_numpy(e.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    # SiT's forward drops the learn_sigma half, DiT's keeps it: [:, :4] reads both alike.
    x = (z - sit(z, torch.full((1,), 1000.0), torch.tensor(labels))[:, :4]).numpy()
  err = float(np.max(np.abs(x.transpose(0, 2, 3, 1) - want)))
  print(f"dit round-trip max abs error (one-step samples): {err:.3g}")
  assert err < 1e-4
  assert json.load(open(os.path.join(out, "export.json")))["source"]["step"] == 7
