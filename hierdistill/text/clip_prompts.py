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

from typing import Any, Sequence

import numpy as np

from hierdistill.text import tokenizer_file

CONTEXT_LENGTH = 77
START, END = "<|startoftext|>", "<|endoftext|>"
WHERE_PUBLISHED = ("openai/clip-vit-large-patch14 on the Hugging Face Hub (tokenizer.json beside "
                   "model.safetensors)")


def load_tokenizer(path: str) -> Any:
  """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one."""
  return tokenizer_file.load_tokenizer(path, WHERE_PUBLISHED)


def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int = CONTEXT_LENGTH
             ) -> np.ndarray:
  """(B, context_length) int32 ids: start, text (truncated), end, zeros."""
  if isinstance(texts, str):
    raise ValueError("tokenize expects a list of texts; got one string (wrap it: [text]).")
  ids = {name: tokenizer_file.token_id(tokenizer, name, f"CLIP's tokenizer of {WHERE_PUBLISHED}")
         for name in (START, END)}
  out = np.zeros((len(texts), context_length), np.int32)
  for row, text in enumerate(texts):
    body = tokenizer.encode(text, add_special_tokens=False).ids[:context_length - 2]
    tokens = [ids[START]] + body + [ids[END]]
    out[row, :len(tokens)] = tokens
  return out
