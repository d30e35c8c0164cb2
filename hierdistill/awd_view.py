"""Where a finished stage 2's AWD looks, drawn after the fact from its workdir.

The training loop draws the same view at the end of stage 2 (evaluation/token_view.py); this one
serves tables and notebooks that hold a finished run: its last checkpoint carries the fake
network and the discriminator, which the exported generator does not.

    picture, means = render_awd_overlay("runs/x", "awd.png", num_samples=40)
"""
from __future__ import annotations

import os
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import checkpoint as ckpt_lib
from hierdistill import pipeline
from hierdistill import sharding as shard_lib
from hierdistill.config_checks import ConfigError
from hierdistill.event_writer import NullWriter
from hierdistill.generator import read_run_config
from hierdistill.sources.base import GRID_SALT
from hierdistill.evaluation import token_view

STAGE = "distribution"


def render_awd_overlay(run: Union[str, "pipeline.Chain"], path: str,
                       num_samples: Optional[int] = None) -> tuple[np.ndarray, dict]:
  """The AWD's token weights over one-step samples of a finished stage-2 run, as an overlay PNG.

  Args:
    run: the run's workdir, or a pipeline.Chain over it (as benchmarks/hd_table.py holds).
    path: where the PNG goes; the per-sample numbers and the weights go beside it as .json.
    num_samples: how many samples; None = the run's grid (the noise and labels of every grid).
      Other counts draw noise from the grid's key and labels as the source's grids do.
  Returns:
    (the overlay, uint8 RGB; the means over samples of
    evaluation/token_weights.token_weight_stats: effective_tokens, max_weight_x_T, and for pixel
    images ink_weight and ink_tokens).
  Raises ConfigError (one line) when the run has no finished stage 2, or its discriminator has
  no token weights to show (mean pooling, no adversarial term, or a model without patches).
  """
  chain = run if isinstance(run, pipeline.Chain) else pipeline.Chain(
      read_run_config(run), run, writer=NullWriter())
  config, workdir = chain.config, chain.workdir
  steps = int(config.distribution.num_steps)
  if not ckpt_lib.is_finished(workdir, STAGE, steps):
    raise ConfigError(f"{workdir} has no finished distribution stage (step {steps}); train "
                      "stage 2 first.")
  stage = pipeline.build_stage(STAGE, config, chain.nets)
  if not stage.shows_token_weights:
    raise ConfigError(
        f"{workdir}: its discriminator has no token weights to show (pooling="
        f"{config.distribution.discriminator.pooling!r}, model {config.model.name!r}); the "
        "overlay needs discriminator.pooling='awd', an adversarial term and a DiT.")
  state = _final_state(chain, stage)
  if num_samples is None:
    noise, c = chain.grid
  else:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), GRID_SALT)
    noise = np.asarray(jax.random.normal(key, (int(num_samples),) + tuple(chain.source.shape)))
    c = chain.source.grid_conditions(int(num_samples))
  c = jax.tree.map(jnp.asarray, c)
  sample_fn = shard_lib.under_mesh(
      jax.jit(stage.sample, out_shardings=shard_lib.replicated(chain.mesh)), chain.mesh)
  samples = np.asarray(jax.device_get(sample_fn(state.ema_params, jnp.asarray(noise), c)))
  picture, _, means = token_view.write_token_weights(
      stage, state, {"teacher": chain.teacher_params}, samples, c, mesh=chain.mesh,
      seed=config.seed, patch_size=stage.patch_size, path=path)
  return picture, means


def _final_state(chain, stage):
  """Stage 2's last train state (generator, fake network, discriminator), on chain's mesh."""
  example_x = jnp.zeros((1,) + tuple(chain.source.shape), jnp.float32)
  example_c = jax.tree.map(jnp.asarray, stage.conditions.example(1))
  abstract = jax.eval_shape(lambda inputs: stage.init(jax.random.PRNGKey(0), example_x,
                                                      example_c, inputs),
                            chain.handoff(STAGE, abstract=True))
  shardings = shard_lib.state_shardings(abstract, chain.mesh, chain.config.sharding_rules)
  ckpts = ckpt_lib.StageCheckpoints(chain.workdir, STAGE, max_to_keep=None)
  try:
    restored = ckpts.restore_latest(shard_lib.with_shardings(abstract, shardings))
  finally:
    ckpts.close()
  if restored is None:
    raise ConfigError(f"{os.path.join(chain.workdir, STAGE)} has no checkpoint to restore; "
                      "train stage 2 first.")
  return restored[0]
