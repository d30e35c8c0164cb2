"""Prompts to CLIP's 77-token ids for the CLIP score (models/clip.py).

As OpenAI's clip.tokenize(texts, truncate=True), which the MJHQ CLIP-score scripts call:
<|startoftext|>, the BPE tokens of the text (the first 75 when longer: truncated, not refused),
<|endoftext|>, then padding to 77 with id 0. CLIP pools its text at the end-of-text token and
attends causally, so what pads after it never changes the embedding (transformers pads with the
end-of-text id instead: same result).

The BPE is the tokenizer.json that ships with the weights (openai/clip-vit-large-patch14),
read by the `tokenizers` package; its normaliser lower-cases and collapses whitespace as
OpenAI's tokenizer does (OpenAI's also runs ftfy and HTML unescaping, which only matter for
broken unicode or entities such as "&amp;" in a prompt).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

CONTEXT_LENGTH = 77
START, END = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
WHERE_PUBLISHED = ("openai/clip-vit-large-patch14 on the Hugging Face Hub (tokenizer.json beside "
                   "model.safetensors)")


def load_tokenizer(path: str) -> Any:
  """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one."""
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading tokenizer.json needs the `tokenizers` package: "
                      "pip install -e . (it is in install_requires)") from None
  file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file}: no such tokenizer file; expected the {TOKENIZER_FILE} of "
                            f"{WHERE_PUBLISHED}")
  return tokenizers.Tokenizer.from_file(file)


def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int = CONTEXT_LENGTH
             ) -> np.ndarray:
  """(B, context_length) int32 ids: start, text (truncated), end, zeros."""
  if isinstance(texts, str):
    raise ValueError("tokenize expects a list of texts; got one string (wrap it: [text]).")
  ids = {name: tokenizer.token_to_id(name) for name in (START, END)}
  for name, token_id in ids.items():
    if token_id is None:
      raise ValueError(f"the tokenizer has no {name!r} token; expected CLIP's tokenizer of "
                       f"{WHERE_PUBLISHED}")
  out = np.zeros((len(texts), context_length), np.int32)
  for row, text in enumerate(texts):
    body = tokenizer.encode(text, add_special_tokens=False).ids[:context_length - 2]
    tokens = [ids[START]] + body + [ids[END]]
    out[row, :len(tokens)] = tokens
  return out
