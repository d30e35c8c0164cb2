"""The 8x8 digits with captions measured from each image, and the text encoder that reads them.

Each digit gets a caption that says more than its class: "a bold, right-leaning seven". Two
attributes are measured from the pixels (ink in [0, 1] = (x + 1) / 2):
  stroke  the ink mass, sum of ink: thin / regular / bold
  slant   how the strokes lean: -cov(row, col) / var(row) over the ink (rows grow downwards,
          so a positive value means the top lies to the right): left-leaning / upright /
          right-leaning
Each is cut into three words at the terciles of its class in the training split, so every class
has each word about a third of the time, and the words cannot be guessed from the class. A
model that ignores the words agrees with both of them about 1 time in 9; the training digits
agree with their own captions every time. `measure_attributes` is the one measurement, used for
the captions and for scoring samples (caption agreement).

The text encoder ships with the project and needs no download: a word table over the fixed
vocabulary below, sinusoidal positions and one pre-LN transformer block, all with fixed random
weights drawn from ENCODER_SEED, never trained. Like a pretrained encoder in a text-to-image
run, it is frozen; the DiT's caption projection and cross-attention learn to read it. Random
32-d word vectors are nearly orthogonal, so no word is lost by leaving the table untrained.
Prompts are tokenised as words (lower case, commas dropped) after a BOS token and padded to
MAX_TOKENS; the empty prompt is the BOS token alone, never an all-padding row.
"""
from __future__ import annotations

import functools
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKE_WORDS = ("thin", "regular", "bold")
SLANT_WORDS = ("left-leaning", "upright", "right-leaning")
PAD, BOS = "<pad>", "<bos>"
VOCAB = (PAD, BOS, "a") + STROKE_WORDS + SLANT_WORDS + DIGIT_WORDS
MAX_TOKENS = 8  # BOS + up to 7 words
ENCODER_WIDTH = 32
ENCODER_SEED = 20251130
Thresholds = np.ndarray  # (num_classes, 2 attributes, 2 cut points)


# -- captions from pixels --------------------------------------------------------------------

def measure_attributes(images: np.ndarray) -> np.ndarray:
  """(N, 8, 8, 1) images in [-1, 1] -> (N, 2) float64: [stroke mass, slant]."""
  ink = np.clip((np.asarray(images, np.float64)[..., 0] + 1.0) / 2.0, 0.0, 1.0)
  n, h, w = ink.shape
  mass = ink.sum(axis=(1, 2))
  total = np.maximum(mass, 1e-6)
  rows = np.arange(h, dtype=np.float64)[None, :, None]
  cols = np.arange(w, dtype=np.float64)[None, None, :]
  r_mean = (ink * rows).sum(axis=(1, 2)) / total
  c_mean = (ink * cols).sum(axis=(1, 2)) / total
  dr = rows - r_mean[:, None, None]
  dc = cols - c_mean[:, None, None]
  cov = (ink * dr * dc).sum(axis=(1, 2)) / total
  var = np.maximum((ink * dr * dr).sum(axis=(1, 2)) / total, 1e-6)
  return np.stack([mass, -cov / var], axis=1)


def fit_thresholds(attributes: np.ndarray, labels: np.ndarray, num_classes: int) -> Thresholds:
  """The terciles of each attribute within each class: (K, 2, 2)."""
  out = np.zeros((num_classes, attributes.shape[1], 2))
  for k in range(num_classes):
    out[k] = np.quantile(attributes[labels == k], [1 / 3, 2 / 3], axis=0).T
  return out


def bucket(attributes: np.ndarray, labels: np.ndarray, thresholds: Thresholds) -> np.ndarray:
  """(N, 2) attribute values -> (N, 2) int word indices (0, 1, 2) by their class's terciles."""
  cuts = thresholds[labels]  # (N, 2, 2)
  return (attributes[..., None] > cuts).sum(axis=-1)


def caption(label: int, stroke: int, slant: int) -> str:
  return f"a {STROKE_WORDS[stroke]}, {SLANT_WORDS[slant]} {DIGIT_WORDS[label]}"


def parse_caption(text: str) -> Tuple[int, int, int]:
  """(label, stroke, slant) of a caption made by `caption` (ValueError otherwise)."""
  words = tokenize_words(text)
  if len(words) != 4 or words[0] != "a" or words[1] not in STROKE_WORDS or (
      words[2] not in SLANT_WORDS or words[3] not in DIGIT_WORDS):
    raise ValueError(f"{text!r} is not a digits caption; write e.g. "
                     f"{caption(7, 2, 2)!r} (stroke: {', '.join(STROKE_WORDS)}; slant: "
                     f"{', '.join(SLANT_WORDS)}).")
  return (DIGIT_WORDS.index(words[3]), STROKE_WORDS.index(words[1]),
          SLANT_WORDS.index(words[2]))


# -- tokens ----------------------------------------------------------------------------------

def tokenize_words(text: str) -> list:
  return text.lower().replace(",", " ").split()


def tokenize(prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
  """Prompts -> (ids (N, MAX_TOKENS) int32, mask (N, MAX_TOKENS) int32): BOS, words, padding."""
  ids = np.zeros((len(prompts), MAX_TOKENS), np.int32)
  for i, prompt in enumerate(prompts):
    words = tokenize_words(prompt)
    unknown = [w for w in words if w not in VOCAB[2:]]
    if unknown:
      raise ValueError(f"prompt {prompt!r}: unknown word(s) {unknown}; the digits vocabulary "
                       f"is {', '.join(VOCAB[2:])}.")
    if len(words) > MAX_TOKENS - 1:
      raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {MAX_TOKENS - 1}.")
    ids[i, :len(words) + 1] = [VOCAB.index(BOS)] + [VOCAB.index(w) for w in words]
  return ids, (ids != VOCAB.index(PAD)).astype(np.int32)


# -- the frozen encoder ----------------------------------------------------------------------

def _positions(length: int, width: int) -> np.ndarray:
  pos = np.arange(length, dtype=np.float64)[:, None]
  freqs = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width // 2))
  return np.concatenate([np.sin(pos * freqs), np.cos(pos * freqs)], axis=1).astype(np.float32)


class WordEncoder(nn.Module):
  """Word table + positions + one pre-LN transformer block (masked self-attention, MLP)."""
  vocab_size: int = len(VOCAB)
  width: int = ENCODER_WIDTH
  num_heads: int = 2

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids, mask: (N, L) -> (N, L, width) float32; padded positions are zero."""
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=nn.initializers.normal(1.0), name="words")(ids)
    x = x + jnp.asarray(_positions(ids.shape[1], self.width))[None]
    attend = (mask[:, None, None, :] != 0)
    h = nn.MultiHeadDotProductAttention(self.num_heads, name="attention")(
        nn.LayerNorm(name="norm_1")(x), mask=attend)
    x = x + h
    h = nn.Dense(2 * self.width, name="mlp_1")(nn.LayerNorm(name="norm_2")(x))
    x = x + nn.Dense(self.width, name="mlp_2")(nn.gelu(h))
    return x * (mask[..., None] != 0)


@functools.lru_cache(maxsize=1)
def _encoder() -> Tuple[WordEncoder, Dict]:
  model = WordEncoder()
  ids = jnp.zeros((1, MAX_TOKENS), jnp.int32)
  params = model.init(jax.random.PRNGKey(ENCODER_SEED), ids, jnp.ones_like(ids))
  return model, params


def encode(prompts: Sequence[str], batch_size: int = 512) -> Dict[str, np.ndarray]:
  """Prompts -> the text condition {'embeddings': (N, L, 32) float32, 'mask': (N, L) int32}."""
  ids, mask = tokenize(prompts)
  model, params = _encoder()
  fn = jax.jit(lambda i, m: model.apply(params, i, m))
  out = [np.asarray(fn(ids[s:s + batch_size], mask[s:s + batch_size]))
         for s in range(0, len(ids), batch_size)]
  embeddings = np.concatenate(out) if out else np.zeros((0, MAX_TOKENS, ENCODER_WIDTH), np.float32)
  return {"embeddings": embeddings.astype(np.float32), "mask": mask}
