"""The tokenizer.json published beside a text encoder's weights, read by the `tokenizers`
package: what clip_prompts.py and sana_prompts.py share (each names its own published file)."""
from __future__ import annotations

import os
from typing import Any

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str, where_published: str) -> Any:
  """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one; a missing file
  names where the published one is."""
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading tokenizer.json needs the `tokenizers` package: "
                      "pip install -e . (it is in install_requires)") from None
  file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file}: no such tokenizer file; expected the {TOKENIZER_FILE} of "
                            f"{where_published}")
  return tokenizers.Tokenizer.from_file(file)


def token_id(tokenizer: Any, token: str, expected: str) -> int:
  """The id of a special token; a tokenizer without it is the wrong file (`expected` says which
  is right)."""
  found = tokenizer.token_to_id(token)
  if found is None:
    raise ValueError(f"the tokenizer has no {token!r} token; expected {expected}")
  return found
