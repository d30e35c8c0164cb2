"""The AWD's token weights over a stage's sample grid: computed once, drawn, summarised.

A stage that has them says so (`shows_token_weights`, stage 2 with an AWD over a DiT) and gives
`token_weights(state, frozen, samples, noise, c) -> (N, T)`. The samples are noised with noise of
their own fixed key, not the training stream's, so that writing the view changes no training
number and two runs of one seed show the same view.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill import sharding as shard_lib
from hierdistill.evaluation import token_weights as tw

# Folded into PRNGKey(config.seed) for the noise the view noises the samples with.
VIEW_SALT = 0x417744


def view_noise(seed: int, shape) -> jax.Array:
  """The fixed noise of the view: the same for every run of a seed, apart from training's."""
  return jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), VIEW_SALT), shape)


def write_token_weights(stage, state, frozen, samples, c, *, mesh, seed: int, patch_size: int,
                        path: str) -> tuple[np.ndarray | None, np.ndarray, dict]:
  """Computes the token weights of `samples` (one pass of the discriminator), writes the overlay
  PNG to path (process 0; the same name .json holds the per-sample numbers and the weights).

  Returns (the overlay, uint8 RGB, None on other processes; the weights (N, T); the means over
  samples of evaluation/token_weights.token_weight_stats).

  Ink numbers are given for pixel images only (1 or 3 channels): a latent has no ink.
  """
  samples = np.asarray(samples, np.float32)
  fn = shard_lib.under_mesh(
      jax.jit(stage.token_weights, out_shardings=shard_lib.replicated(mesh)), mesh)
  weights = np.asarray(jax.device_get(fn(state, frozen, jnp.asarray(samples),
                                         view_noise(seed, samples.shape),
                                         jax.tree.map(jnp.asarray, c))))
  stats = tw.token_weight_stats(samples, weights, patch_size)
  if samples.shape[-1] not in (1, 3):
    stats = {k: v for k, v in stats.items() if not k.startswith("ink")}
  if jax.process_index() == 0:
    picture = tw.save_overlay(samples, weights, patch_size, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
      json.dump({"mean": tw.summarise(stats), "num_tokens": int(weights.shape[1]),
                 "per_sample": {k: v.tolist() for k, v in stats.items()},
                 "token_weights": weights.tolist()}, f, indent=1)
  else:
    picture = None
  return picture, weights, tw.summarise(stats)


def describe(means: dict, num_tokens: int) -> str:
  """One line: how many tokens the head effectively reads, and its weight on ink."""
  line = f"effective tokens {means['effective_tokens']:.1f} of {num_tokens}"
  if "ink_weight" in means:
    line += (f"; {100 * means['ink_weight']:.0f}% of the weight on ink tokens, which are "
             f"{100 * means['ink_tokens']:.0f}% of the tokens")
  return line
