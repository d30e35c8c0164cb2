"""Softmax attention as plain XLA ops, for the frozen text and image encoders (CLIP, Gemma-2).

Logits in float32 whatever the compute dtype (a bfloat16 softmax loses the small weights), masked
with float32's lowest finite value rather than -inf (a query that may attend to nothing gets a
uniform, finite row instead of NaN), and plain einsums that jax.jvp and every backend trace.
Layouts: q (B, L, H, hd) with k, v of H heads too, ordinary multi-head attention (CLIP); or
q (B, L, KV, G, hd), KV key/value heads each read by G query heads (grouped-query attention,
transformers' repeat_kv order: query head h = kv_head * G + g; Gemma-2). Each layout keeps its
own einsums: XLA orders the float32 sums of the two forms differently (CLIP's image embedding
moved by 5e-7 through the grouped form with G = 1), and the encoders' numbers stay as they were.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def softmax_attention(q: Array, k: Array, v: Array, *, scale: float,
                      allowed: Optional[Array] = None,
                      softcap: Optional[float] = None) -> Array:
  """q: (B, Lq, H, hd) or (B, Lq, KV, G, hd); k, v: (B, Lk, H or KV, hd); allowed: bool,
  broadcastable to the logits (B, H, Lq, Lk) or (B, KV, G, Lq, Lk), or None for all; softcap:
  logits -> cap tanh(logits / cap) (Gemma-2). Returns q's shape in v's dtype."""
  grouped = q.ndim == 5
  qk, wv = (("bqkgd,bskd->bkgqs", "bkgqs,bskd->bqkgd") if grouped else
            ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd"))
  logits = jnp.einsum(qk, q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum(wv, weights, v)
