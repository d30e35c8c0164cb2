"""A published DiT (DDPM noise predictor) as the chain's teacher: every place the chain calls the
teacher reads our velocity through the DDPM adapter.

The closed form the chain is held to, written here in numpy from the DDPM definitions alone:
s(t) is the DiT step whose noise-to-signal ratio sqrt((1 - abar_s) / abar_s) is t / (1 - t),
x_s = z / sqrt((1 - t)^2 + t^2), eps_w = eps(x_s, s | null) + w (eps(x_s, s | c) - eps(x_s, s | null)),
v = (eps_w - z) / (1 - t). eps is the imported network read raw (the same params with the
adapter off), which tests/test_convert_dit.py holds to the PyTorch DiT.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import imagenet256
from hierdistill import conditions as cond_lib
from hierdistill import paths
from hierdistill.config_checks import ConfigError
from hierdistill.convert import dit as convert_dit
from hierdistill.convert import from_config
from hierdistill.evaluation import driver
from hierdistill.models.dit import sincos_pos_embed_2d
from hierdistill.pipeline import Networks
from hierdistill.stages import common
from hierdistill.stages.distribution import DistributionStage
from hierdistill.stages.trajectory import TrajectoryStage

K = 10  # classes of the tiny model; K is the null label


def dit_config(tmp_path):
  """imagenet256:runlocal's tiny network as a DiT teacher imported from a published-layout file
  with random weights (safetensors: no torch needed)."""
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  c = imagenet256.get_config("runlocal")
  c.model.update(num_classes=K, **convert_dit.MODEL_FIELDS["dit"])
  m = c.model
  layout = convert_dit.published_layout(
      depth=m.depth, hidden_size=m.hidden_size, patch_size=m.patch_size,
      in_channels=m.in_channels, out_channels=m.out_channels, num_classes=K,
      input_size=m.input_size)
  rng = np.random.default_rng(0)
  sd = {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in layout.items()}
  sd["pos_embed"] = sincos_pos_embed_2d(m.hidden_size, m.input_size // m.patch_size)[None]
  path = str(tmp_path / "DiT-tiny.safetensors")
  safetensors_numpy.save_file(sd, path)
  c.stages = ("trajectory", "distribution", "eval")
  c.teacher.update(init_checkpoint=path, checkpoint_kind="dit")
  return c


def ddpm_closed_form(eps_fn, z, t, c, *, w=1.0, guided_channels=None):
  """v = (eps_w(x_s, s) - z) / (1 - t) in float64 numpy (module docstring)."""
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
  log_nsr = 0.5 * np.log((1 - abar) / abar)
  t = np.clip(np.asarray(t, np.float64), 1 / (1 + np.exp(-log_nsr[0])),
              1 / (1 + np.exp(-log_nsr[-1])))
  s = np.interp(np.log(t / (1 - t)), log_nsr, np.arange(1000.0))
  x_s = np.asarray(z, np.float64) / np.sqrt((1 - t) ** 2 + t ** 2)[:, None, None, None]
  eps_c = np.asarray(eps_fn(x_s, s, c), np.float64)
  eps = eps_c
  if w != 1.0:
    eps_u = np.asarray(eps_fn(x_s, s, np.full_like(c, K)), np.float64)
    eps = eps_u + w * (eps_c - eps_u)
    if guided_channels is not None:
      eps = np.concatenate([eps[..., :guided_channels], eps_c[..., guided_channels:]], -1)
  return (eps - np.asarray(z, np.float64)) / (1 - t)[:, None, None, None]


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
  """(config, networks, imported params, eps_fn of the raw network)."""
  config = dit_config(tmp_path_factory.mktemp("dit"))
  nets = Networks(config, cond_lib.Labels(K))
  params = from_config.load_teacher(config, nets.teacher)
  raw = nets.teacher.clone(prediction="velocity", time_scale=1.0, time_flip=False)
  apply_raw = jax.jit(lambda x, s, y: raw.apply({"params": params}, x, None, s, y))
  eps_fn = lambda x, s, y: apply_raw(jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32),
                                     jnp.asarray(y, jnp.int32))
  return config, nets, params, eps_fn


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)
  t = np.array([0.0, 0.02, 0.3, 0.5, 0.97, 1.0], np.float32)
  c = np.array([0, 3, K, 9, 5, K], np.int32)  # K = the null label
  return z, t, c


def _close(got, want, t):
  """Equal as eps - z = (1 - t) v, to 1e-3 of the largest: the adapter's 1 / (1 - t) ~ 160 at
  t(999) ~ 0.994 magnifies float32 rounding in v itself, and s(t) in float32 is off by ~1e-4
  steps, to which these random weights are sensitive (a 0.2% change of eps at s = 999)."""
  w = (1.0 - np.minimum(np.asarray(t, np.float64), 0.9937))[:, None, None, None]
  want = np.asarray(want) * w
  assert float(np.std(want)) > 0.1  # not trivially zero
  np.testing.assert_allclose(np.asarray(got, np.float64) * w, want,
                             atol=1e-3 * float(np.abs(want).max()), rtol=1e-3)


def test_teacher_and_fake_network_read_the_adapter_and_the_student_is_a_velocity_model(dit):
  config, nets, params, eps_fn = dit
  z, t, c = _inputs()
  want = ddpm_closed_form(eps_fn, z, t, c)
  _close(jax.jit(common.velocity_fn(nets.teacher, params))(z, t, c), want, t)
  # Stage 2's fake network is the teacher's network from the teacher's params: at step 0 it
  # is the teacher's velocity exactly (DMD's gradient starts from the generator's error only).
  stage2 = DistributionStage(config, nets.student, nets.teacher, nets.discriminator,
                             cond_lib.Labels(K))
  _close(jax.jit(common.velocity_fn(stage2.fake, params))(z, t, c), want, t)
  # Its token features (the discriminator's input) come from the same adapted call.
  _, feats = stage2.fake.apply({"params": params}, z, None, t, c, return_features=True)
  assert len(feats) == len(config.model.feature_layers)
  # The student: a velocity DiT (no adapter: 1 / (1 - t) is unbounded at t = 1) on the
  # teacher's weights.
  assert nets.student.prediction == "velocity" and nets.student.interval_conditioning
  assert nets.student.time_scale == 1000.0
  stage1 = TrajectoryStage(config, nets.student, nets.teacher, cond_lib.Labels(K))
  state = stage1.init(jax.random.PRNGKey(0), jnp.asarray(z), jnp.asarray(c),
                      {"teacher": params})
  np.testing.assert_array_equal(state.params["blocks_1"]["mlp"]["fc1"]["kernel"],
                                params["blocks_1"]["mlp"]["fc1"]["kernel"])


def test_stage1_target_and_real_score_are_the_guided_adapter(dit):
  config, nets, params, eps_fn = dit
  z, t, c = _inputs(1)
  w = config.trajectory.cfg_scale
  assert w == config.distribution.cfg_scale == 1.5
  want = ddpm_closed_form(eps_fn, z, t, c, w=w)
  stage1 = TrajectoryStage(config, nets.student, nets.teacher, cond_lib.Labels(K))
  _close(jax.jit(stage1.teacher_velocity)(params, z, t, c), want, t)
  # Stage 2's real score is the same guided call of the teacher (stages/distribution.py).
  stage2 = DistributionStage(config, nets.student, nets.teacher, nets.discriminator,
                             cond_lib.Labels(K))
  real = paths.cfg_velocity(common.velocity_fn(stage2.teacher, params), z, t, c,
                            w=stage2.cfg.cfg_scale, null=stage2.conditions.null_like(c))
  _close(real, want, t)


def test_eval_teacher_sampler_is_euler_on_the_guided_adapter(dit):
  config, nets, params, eps_fn = dit
  z, _, c = _inputs(2)
  s = config.sample  # runlocal: Euler, CFG 1.5 on the first 3 of 4 channels (DiT's sampler)
  assert s.teacher_method == "euler" and s.guided_channels == 3
  chain = types.SimpleNamespace(config=config, nets=nets,
                                source=types.SimpleNamespace(conditions=cond_lib.Labels(K)))
  got = jax.jit(driver.teacher_sampler(chain, 3))(params, z, c)
  x = np.asarray(z, np.float64)
  grid = np.linspace(1.0, 0.0, 4)
  for t0, t1 in zip(grid[:-1], grid[1:]):
    v = ddpm_closed_form(eps_fn, x.astype(np.float32), np.full((6,), t0), c, w=s.cfg_scale,
                         guided_channels=3)
    x = x + (t1 - t0) * v
  np.testing.assert_allclose(np.asarray(got), x, atol=2e-3 * float(np.abs(x).max()), rtol=2e-3)


def test_a_dit_file_with_a_velocity_model_is_refused_in_one_line(tmp_path):
  config = dit_config(tmp_path)
  config.model.prediction = "velocity"
  nets = Networks(config, cond_lib.Labels(K))
  with pytest.raises(ConfigError, match=r"config\.model\.prediction='velocity' but a DIT "
                     "checkpoint needs 'ddpm_noise'"):
    from_config.check_teacher_model(config, nets.teacher)
  config.teacher.checkpoint_kind = "edm"
  with pytest.raises(ConfigError, match=r"config\.teacher\.checkpoint_kind='edm'"):
    from_config.check_teacher_model(config, nets.teacher)


@pytest.mark.slow
def test_chain_distils_an_imported_dit_file(tmp_path):
  """Both stages and the eval from a published-layout DiT file (random weights)."""
  from hierdistill import pipeline
  config = dit_config(tmp_path)
  config.model.num_classes = 1000  # mock ImageNet's labels
  m = config.model
  layout = convert_dit.published_layout(
      depth=m.depth, hidden_size=m.hidden_size, patch_size=m.patch_size,
      in_channels=m.in_channels, out_channels=m.out_channels, num_classes=1000,
      input_size=m.input_size)
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  rng = np.random.default_rng(1)
  sd = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in layout.items()}
  sd["pos_embed"] = sincos_pos_embed_2d(m.hidden_size, m.input_size // m.patch_size)[None]
  safetensors_numpy.save_file(sd, config.teacher.init_checkpoint)
  summary = pipeline.run(config, str(tmp_path / "run"))
  assert [r["model"] for r in summary["eval"]["rows"]] == [
      "teacher (4 steps)", "stage 1 (TD) (1 step)", "stage 2 (HD) (1 step)"]
  for stage in ("trajectory", "distribution"):
    assert np.isfinite(summary["stages"][stage]["final_metrics"]["loss"])
  assert all(np.isfinite(r["FD-random-inception"]) for r in summary["eval"]["rows"])
