"""LightningDiT (models/lightningdit.py) and its importer (convert/lightningdit.py).

Against tests/torch_reference/lightningdit.py (a restatement of the official models file) with
random weights: v(z, t | y) == -LightningDiT(z, 1 - t, y) (SiT's convention, as the official
transport's). And what every backbone of the chain must hold: the student's interval embedding
exact at init, token features for the AWD, remat, the batch pins under an FSDP mesh, and a JVP
equal to finite differences in float64.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdistill import sharding
from hierdistill.convert import lightningdit as convert_ld
from hierdistill.models import build, init_student_from_teacher
from hierdistill.models.student import student_of
from hierdistill.models.lightningdit import LightningDiT
from tests.torch_reference import training_files

TINY = dict(input_size=4, in_channels=8, patch_size=1, hidden_size=32, depth=2, num_heads=2,
            num_classes=10, **convert_ld.MODEL_FIELDS)
TORCH_TINY = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=32, depth=2,
                  num_heads=2, num_classes=10)


def _inputs(dtype=np.float32, seed=1):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((5, 4, 4, 8)).astype(dtype)
  t = np.array([0.0, 0.3, 0.5, 0.97, 1.0], dtype)
  y = np.array([0, 3, 10, 9, 10], np.int32)  # 10 = the null label
  return z, t, y


def _random(params, scale=0.2, seed=0):
  """Random "trained" weights everywhere (the zero inits would make the output 0)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape, l.dtype)
                                   for l, k in zip(leaves, keys)])


def test_published_xl1_layout_and_param_count():
  layout = convert_ld.published_layout(depth=28, hidden_size=1152, num_heads=16, patch_size=1,
                                       in_channels=32, num_classes=1000, input_size=16)
  # torch's model.parameters() of LightningDiT-XL/1 (pos_embed included, rotary buffers not).
  assert convert_ld.param_count(layout) == 675_256_736
  assert layout["blocks.0.mlp.w12.weight"] == (2 * 3072, 1152)
  assert layout["feat_rope.freqs_cos"] == (256, 72)
  model = build(dict(name="lightningdit", num_classes=1000))  # defaults: XL/1 on 16x16x32
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 32)), None,
                          jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  ours = sum(a.size for a in jax.tree.leaves(shapes))
  assert ours + 256 * 1152 == 675_256_736  # + the fixed pos_embed, a constant here


@pytest.mark.torch
def test_reference_state_dict_layout_is_the_published_one():
  torch = pytest.importorskip("torch")
  from tests.torch_reference.lightningdit import LightningDiT as TorchLD
  with torch.device("meta"):
    ref = TorchLD()
  got = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert got == convert_ld.published_layout(depth=28, hidden_size=1152, num_heads=16,
                                            patch_size=1, in_channels=32, num_classes=1000,
                                            input_size=16)


@pytest.mark.torch
@pytest.mark.parametrize("qk_norm", [False, True])
def test_import_matches_reference_velocity(tmp_path, qk_norm):
  torch = pytest.importorskip("torch")
  from tests.torch_reference.lightningdit import LightningDiT as TorchLD
  torch.manual_seed(0)
  ref = TorchLD(qk_norm=qk_norm, **TORCH_TINY).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name != "pos_embed":
        # RMSNorm weights around 1, everything else around 0.
        p.copy_(float("norm" in name) + 0.2 * torch.randn_like(p))
  path = str(tmp_path / "lightningdit.pt")
  torch.save(training_files.dit_style(torch, ref.state_dict()), path)  # train.py's layout
  model = LightningDiT(qk_norm=qk_norm, **TINY)
  params = convert_ld.load_lightningdit_checkpoint(path, model)
  z, t, y = _inputs()
  ours = jax.jit(lambda p, z, t, y: model.apply({"params": p}, z, None, t, y))(params, z, t, y)
  with torch.no_grad():
    out = ref(torch.from_numpy(z).permute(0, 3, 1, 2), torch.from_numpy(1.0 - t),
              torch.from_numpy(y).long()).numpy()
  want = -out.transpose(0, 2, 3, 1)
  assert float(np.std(want)) > 0.1
  np.testing.assert_allclose(np.asarray(ours), want, atol=5e-5 * float(np.abs(want).max()),
                             rtol=1e-4)


def test_wrong_files_are_one_line_naming_the_key_and_where_published():
  model = LightningDiT(**TINY)
  layout = convert_ld.layout_of_model(model)
  from hierdistill.models.dit import sincos_pos_embed_2d
  from hierdistill.models.lightningdit import rope_tables
  sd = {k: np.zeros(s, np.float32) for k, s in layout.items()}
  sd["pos_embed"] = sincos_pos_embed_2d(32, 4)[None]
  sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = rope_tables(16, 4)
  convert_ld.import_lightningdit(sd, model)  # the good one imports
  bad = dict(sd, **{"blocks.0.attn.q_norm.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 'blocks\.0\.attn\.q_norm\.weight'.*"
                     "qk_norm.*in x.pt.*hustvl/lightningdit-xl-imagenet256-800ep"):
    convert_ld.import_lightningdit(bad, model, path="x.pt")
  bad = dict(sd, **{"feat_rope.freqs_sin": sd["feat_rope.freqs_cos"]})
  with pytest.raises(ValueError, match=r"feat_rope\.freqs_sin differs"):
    convert_ld.import_lightningdit(bad, model, path="x.pt")
  with pytest.raises(ValueError, match=r"config\.model\.time_flip=False"):
    convert_ld.import_lightningdit(sd, model.clone(time_flip=False))
  with pytest.raises(FileNotFoundError, match="lightningdit-xl-imagenet256-800ep.pt"):
    convert_ld.load_lightningdit_checkpoint("/nonexistent.pt", model, config_key="k")


def test_student_is_exact_at_init_features_and_remat():
  teacher = LightningDiT(feature_layers=(0, -1), **{**TINY, "depth": 2})
  student = student_of(teacher)
  remat = student.clone(remat=True)
  z, t, y = _inputs()
  r = t * 0.3
  # One init (the student's); the teacher's params are the same tree without the interval
  # embedder, randomised so that every block matters.
  fresh = jax.jit(student.init)(jax.random.PRNGKey(1), z, r, t, y)["params"]
  tp = _random({k: v for k, v in fresh.items() if k != "interval_embedder"})
  sp = init_student_from_teacher(fresh, tp)
  loss = lambda m: lambda p: jnp.sum(jnp.square(m.apply({"params": p}, z, r, t, y)))

  @jax.jit
  def run(tp, sp):
    v = teacher.apply({"params": tp}, z, None, t, y)
    u, feats = student.apply({"params": sp}, z, r, t, y, return_features=True)
    return v, u, feats, jax.grad(loss(student))(sp), jax.grad(loss(remat))(sp)

  v, u, feats, g0, g1 = run(tp, sp)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(v))  # the interval adds exact 0.0
  assert [f.shape for f in feats] == [(5, 16, 32)] * 2
  # Remat: the same gradients.
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_jvp_matches_finite_difference_in_float64():
  """MeanFlow's du/dt through RMSNorm, rotary attention and SwiGLU: jax.jvp with tangents
  (v, 0, 1) == central difference, in float64."""
  with jax.enable_x64(True):
    model = student_of(LightningDiT(dtype=jnp.float64, param_dtype=jnp.float64, qk_norm=True,
                                    **{**TINY, "depth": 1}))
    z, t, y = _inputs(np.float64)
    t = jnp.asarray(np.clip(t, 0.05, 0.95))
    r = t * 0.5
    params = jax.jit(model.init)(jax.random.PRNGKey(0), z, r, t, y)["params"]
    params = _random(params, scale=0.1)
    v_dir = jnp.asarray(np.random.default_rng(7).standard_normal(z.shape))
    eps = 1e-6

    @jax.jit
    def jvp_and_fd(p):
      u_fn = lambda z_, r_, t_: model.apply({"params": p}, z_, r_, t_, y)
      u, du = jax.jvp(u_fn, (z, r, t), (v_dir, jnp.zeros_like(r), jnp.ones_like(t)))
      fd = (u_fn(z + eps * v_dir, r, t + eps) - u_fn(z - eps * v_dir, r, t - eps)) / (2 * eps)
      return du, fd

    du, fd = jvp_and_fd(params)
    assert du.dtype == jnp.float64 and float(jnp.max(jnp.abs(du))) > 1e-3
    np.testing.assert_allclose(du, fd, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(du))))


def test_under_an_fsdp_mesh_it_computes_what_it_computes_alone():
  """The batch pins (every Dense) change the layout, never the numbers, on a (4, 2) mesh."""
  net = student_of(LightningDiT(feature_layers=(0,), **{**TINY, "hidden_size": 64, "depth": 1}))
  mesh = sharding.make_mesh(4, 2, devices=jax.devices()[:8])
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(16, 4, 4, 8)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(16,)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=(16,)), jnp.int32)
  params = _random(jax.jit(net.init)(jax.random.PRNGKey(0), z[:1], t[:1], t[:1], y[:1])["params"],
                   0.02)
  fwd = lambda p, z, t, y: net.apply({"params": p}, z, t * 0.5, t, y, return_features=True)
  alone = jax.jit(fwd)(params, z, t, y)
  shardings = sharding.state_shardings(params, mesh, ((".*", "fsdp"),))
  assert any("fsdp" in s.spec for s in jax.tree.leaves(shardings))
  batch = sharding.batch_sharding(mesh)
  jaxpr = sharding.under_mesh(lambda: jax.make_jaxpr(fwd)(params, z, t, y), mesh)()
  assert "sharding_constraint" in str(jaxpr)
  meshed = sharding.under_mesh(jax.jit(fwd, in_shardings=(shardings, batch, batch, batch)),
                               mesh)(jax.device_put(params, shardings),
                                     *jax.device_put((z, t, y), batch))
  assert meshed[0].sharding.spec[0] == ("data", "fsdp")
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(meshed)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
