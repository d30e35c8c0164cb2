"""Test setup: 8 fake CPU devices, so sharding is tested without an accelerator.

XLA reads the flag once, when jax initialises its backend: it must be set before jax is imported.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by tfds and clu) must not grab the accelerator or spam the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
