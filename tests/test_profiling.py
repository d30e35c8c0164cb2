"""config.profile: a jax.profiler trace of chosen steps of a stage, in the layout TensorBoard's
profile plugin reads (plugins/profile/<session>/*.xplane.pb) plus Perfetto's trace; off by
default; a malformed value is one line before anything compiles."""
import glob
import os

import jax
import pytest

from experiments import toy2d
from hierdistill import pipeline, profiling
from hierdistill.config_checks import ConfigError, validate_config
from hierdistill.event_writer import NullWriter


def test_profile_traces_the_chosen_steps_of_a_stage(tmp_path, capsys):
  config = toy2d.get_config("tiny")  # an MLP on 2-D points: the stage compiles in seconds
  config.stages = ("teacher",)
  config.profile = (1, 2)
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir, devices=jax.devices()[:1], writer=NullWriter())
  folder = profiling.profile_dir(workdir, "teacher")
  sessions = glob.glob(os.path.join(folder, "plugins", "profile", "*"))
  assert len(sessions) == 1, sessions  # one trace, started once, stopped once
  names = os.listdir(sessions[0])
  assert any(n.endswith(".xplane.pb") for n in names), names  # TensorBoard's profile plugin
  assert "perfetto_trace.json.gz" in names, names  # ui.perfetto.dev
  assert "[profile] steps 1..2 traced" in capsys.readouterr().out


def test_profile_is_off_by_default_and_checked(tmp_path):
  config = toy2d.get_config("tiny")
  assert config.profile == () and not config.profile_all_processes
  assert not profiling.StepProfiler(config, str(tmp_path), "teacher").enabled
  for bad in ((3,), (-1, 2), (0, 0), (1.5, 2)):
    config.profile = bad
    with pytest.raises(ConfigError, match=r"^config\.profile=.*give \(start_step, num_steps\)"):
      validate_config(config)


def test_one_process_or_all(tmp_path, monkeypatch):
  """On a pod only process 0 traces, unless profile_all_processes: then each process writes its
  own folder (two processes on one host would otherwise name the same files)."""
  config = toy2d.get_config("tiny")
  config.profile = (2, 3)
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  for index, everyone, enabled, folder in ((0, False, True, ""), (1, False, False, ""),
                                           (1, True, True, "process_1")):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    config.profile_all_processes = everyone
    p = profiling.StepProfiler(config, str(tmp_path), "trajectory")
    assert p.enabled == enabled
    base = profiling.profile_dir(str(tmp_path), "trajectory")
    assert p.log_dir == (os.path.join(base, folder) if folder else base)
    assert (p.first, p.end) == (2, 5)
