"""SANA's text condition: prompts -> Gemma-2 -> {'embeddings': (B, 300, 2304), 'mask': (B, 300)}.

The frozen encoder of the teacher, run as SanaPipeline runs it (text/sana_prompts.py): the
complex human instruction before each prompt, the whole sequence through Gemma-2, then BOS and
the last 299 positions kept. The null condition is the empty prompt without the instruction
(SANA's negative prompt), `null()`.

`random_encoder` builds a tiny random Gemma-2 and a word-level tokenizer for tests and runlocal:
its encodings are deterministic functions of the words, nothing more.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hierdistill.text import sana_prompts


class SanaTextEncoder:
  """Prompts -> SANA's condition, on the devices (host numpy out).

  model, params: a Gemma2Encoder and its params. tokenizer: a `tokenizers.Tokenizer` with
  Gemma's <bos> and <pad>. use_instruction: prefix the complex human instruction (SANA's
  default, and how the published teachers were sampled). max_sequence_length: 300 in SANA.
  batch_size: prompts encoded at a time (0: all at once). Each row is encoded alone, so it
  changes only memory: planned at the most tokens the instruction can take, the attention of
  64 instruction-prefixed prompts does not fit one v5e chip beside the 2B weights
  (launch/plan.py --programs=encoder).
  """

  def __init__(self, model, params, tokenizer, *, use_instruction: bool = True,
               max_sequence_length: int = sana_prompts.MAX_SEQUENCE_LENGTH,
               batch_size: int = 0):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.instruction = sana_prompts.COMPLEX_HUMAN_INSTRUCTION if use_instruction else None
    self.max_sequence_length = int(max_sequence_length)
    self.batch_size = int(batch_size)
    self.width = int(model.hidden_size)
    self._encode = jax.jit(encode_fn(model, self.max_sequence_length))

  def __call__(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]:
    """{'embeddings': (B, L, D) float32, 'mask': (B, L) int32}, L = max_sequence_length."""
    ids, mask = sana_prompts.tokenize(self.tokenizer, list(prompts), instruction=self.instruction,
                                      max_sequence_length=self.max_sequence_length)
    return self._run(ids, mask)

  def _run(self, ids, mask) -> Dict[str, np.ndarray]:
    b = len(ids)
    step = min(self.batch_size or b, b)
    pad = -b % step  # a short last chunk is padded with copies of the last row: one shape
    ids_p, mask_p = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (ids, mask))
    emb = np.concatenate([
        np.asarray(self._encode(self.params, jnp.asarray(ids_p[i:i + step]),
                                jnp.asarray(mask_p[i:i + step])), np.float32)
        for i in range(0, b + pad, step)])[:b]
    return {"embeddings": emb,
            "mask": np.asarray(sana_prompts.select(mask, self.max_sequence_length), np.int32)}

  def null(self) -> Tuple[np.ndarray, np.ndarray]:
    """The empty prompt's (L, D) embeddings and (L,) mask: the null condition of CFG."""
    ids, mask = sana_prompts.tokenize_negative(self.tokenizer, 1,
                                               max_sequence_length=self.max_sequence_length)
    out = self._run(ids, mask)
    return out["embeddings"][0], out["mask"][0]


def encode_fn(model, max_sequence_length: int):
  """(params, ids, mask) -> (B, max_sequence_length, D): Gemma-2's last hidden state at BOS and
  the last max_sequence_length - 1 positions (sana_prompts.select). What SanaTextEncoder jits,
  and what launch/plan.py compiles as the run's "encoder" program."""
  return lambda params, ids, mask: sana_prompts.select(
      model.apply({"params": params}, ids, mask), max_sequence_length)


def word_tokenizer(texts: Sequence[str], specials: Sequence[str]) -> Any:
  """A lower-case whitespace word-level `tokenizers.Tokenizer` over the words of `texts`, the
  specials first (ids 0, 1, ...), for tests and runlocal; unknown words map to the last special."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {s: i for i, s in enumerate(specials)}
  pre = pre_tokenizers.Whitespace()
  for text in texts:
    for word, _ in pre.pre_tokenize_str(text.lower()):
      vocab.setdefault(word, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=specials[-1]))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre
  return tok


def random_encoder_module(sizes: Optional[Dict[str, Any]] = None, tokenizer: Any = None):
  """random_encoder's Gemma2Encoder, float32: GEMMA2_TINY updated by `sizes`, its vocabulary
  at least the tokenizer's (when given)."""
  from hierdistill.models.gemma2 import GEMMA2_TINY, Gemma2Encoder  # pylint: disable=g-import-not-at-top
  fields = {**GEMMA2_TINY, "dtype": jnp.float32, **(sizes or {})}
  if tokenizer is not None:
    fields["vocab_size"] = max(int(fields["vocab_size"]), tokenizer.get_vocab_size())
  return Gemma2Encoder(**fields)


def random_encoder(texts: Sequence[str] = (), *, tokenizer: Any = None,
                   sizes: Optional[Dict[str, Any]] = None, seed: int = 0,
                   **kwargs) -> SanaTextEncoder:
  """A tiny random Gemma-2 (GEMMA2_TINY updated by `sizes`) with `tokenizer`, by default a word
  tokenizer over the instruction and `texts`: tests and runlocal only."""
  tok = tokenizer or word_tokenizer(list(sana_prompts.COMPLEX_HUMAN_INSTRUCTION) + list(texts),
                                    ("<pad>", "<eos>", "<bos>", "<unk>"))
  model = random_encoder_module(sizes, tok)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), ids, jnp.ones_like(ids))["params"]
  return SanaTextEncoder(model, params, tok, **kwargs)
