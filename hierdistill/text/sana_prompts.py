"""SANA's prompt preparation for its Gemma-2 text encoder, as diffusers' SanaPipeline does it.

The facts (diffusers pipelines/sana/pipeline_sana.py, `encode_prompt` and
`_get_gemma_prompt_embeds`, default arguments; T2I.md section 1):
1. each prompt is lower-cased and stripped (`_text_preprocessing` with clean_caption=False);
2. the complex human instruction (CHI, the 8 lines below joined by "\\n") is prefixed to it;
3. it is tokenized with BOS, truncated and right-padded to max_length = n_chi + 300 - 2, n_chi
   being the length of the tokenized CHI alone, BOS included;
4. Gemma-2 encodes the whole sequence (ids and mask);
5. of the hidden states and the mask, position 0 (BOS) and the last 299 positions are kept
   (select_index = [0] + range(-299, 0)): (B, 300, 2304) and (B, 300).
The negative (null) prompt "" is encoded without the CHI at max_length 300, where step 5 keeps
everything.

So the encoder must see the full (B, n_chi + 298) sequence: selecting the ids before encoding
would drop the instruction the kept tokens attend to (Gemma is causal). `tokenize` returns that
full sequence; `select` applies step 5 to the encoder's output and to the mask.

The tokenizer is the tokenizer.json that ships with the Gemma-2 weights
(Efficient-Large-Model/gemma-2-2b-it), read by the `tokenizers` package (no transformers, no
torch). BOS is prepended here, as GemmaTokenizer does (add_bos_token=True, add_eos_token=False),
and the file's own post-processor is not relied on.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from hierdistill.text import tokenizer_file

MAX_SEQUENCE_LENGTH = 300  # SanaPipeline's max_sequence_length
BOS_TOKEN, PAD_TOKEN = "<bos>", "<pad>"  # Gemma's special tokens (ids 2 and 0 in its vocab)
WHERE_PUBLISHED = ("Efficient-Large-Model/gemma-2-2b-it or google/gemma-2-2b-it on the Hugging "
                   "Face Hub (tokenizer.json beside the weights)")

# SanaPipeline.__call__'s default `complex_human_instruction`, line by line: data, kept verbatim
# (the teacher was trained and is sampled with exactly these tokens in front of every prompt).
COMPLEX_HUMAN_INSTRUCTION: Tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual "
    "descriptions suitable for image generation. Evaluate the level of detail in the user "
    "prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, "
    "textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly "
    "without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round "
    "shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red "
    "flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, "
    "featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a "
    "double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any "
    "additional commentary or evaluations:",
    "User Prompt: ",
)


def load_tokenizer(path: str) -> Any:
  """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one."""
  return tokenizer_file.load_tokenizer(path, WHERE_PUBLISHED)


def _token_id(tokenizer: Any, token: str) -> int:
  return tokenizer_file.token_id(tokenizer, token, f"the Gemma tokenizer of {WHERE_PUBLISHED}")


def _encode(tokenizer: Any, text: str, bos: int) -> list:
  return [bos] + tokenizer.encode(text, add_special_tokens=False).ids


def preprocess(prompt: str) -> str:
  """SanaPipeline's text preprocessing without caption cleaning: lower-case, strip."""
  return prompt.lower().strip()


def instruction_length(tokenizer: Any, instruction: Sequence[str] = COMPLEX_HUMAN_INSTRUCTION
                       ) -> int:
  """n_chi: tokens of the joined instruction alone, BOS included."""
  return len(_encode(tokenizer, "\n".join(instruction), _token_id(tokenizer, BOS_TOKEN)))


def instruction_length_bound(instruction: Sequence[str] = COMPLEX_HUMAN_INSTRUCTION) -> int:
  """The most n_chi can be whatever the tokenizer: the joined instruction's UTF-8 bytes, plus
  BOS (every token of Gemma's byte-fallback vocabulary spells at least one byte). For plans made
  where no tokenizer file is at hand."""
  return len("\n".join(instruction).encode()) + 1


def sequence_length(n_chi: int, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> int:
  """L, the encoder's input length with the instruction: n_chi + max_sequence_length - 2
  (SanaPipeline's max_length_all)."""
  return n_chi + max_sequence_length - 2


def tokenize(tokenizer: Any, prompts: Sequence[str], *,
             instruction: Optional[Sequence[str]] = COMPLEX_HUMAN_INSTRUCTION,
             max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Tuple[np.ndarray, np.ndarray]:
  """The encoder's input for a batch of prompts: (ids, mask), each (B, L) int32.

  L = n_chi + max_sequence_length - 2 with the instruction, max_sequence_length without it
  (instruction=None or (): the negative prompt). BOS first, truncated to L, right-padded with
  the pad id; mask 1 on real tokens. Encode all L positions, then apply `select`.
  """
  if isinstance(prompts, str):
    raise ValueError("tokenize expects a list of prompts; got one string (wrap it: [prompt]).")
  bos, pad = _token_id(tokenizer, BOS_TOKEN), _token_id(tokenizer, PAD_TOKEN)
  prefix = "\n".join(instruction) if instruction else ""
  length = max_sequence_length
  if instruction:
    length = sequence_length(len(_encode(tokenizer, prefix, bos)), max_sequence_length)
  ids = np.full((len(prompts), length), pad, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens = _encode(tokenizer, prefix + preprocess(prompt), bos)[:length]
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask


def tokenize_negative(tokenizer: Any, batch_size: int, negative_prompt: str = "", *,
                      max_sequence_length: int = MAX_SEQUENCE_LENGTH
                      ) -> Tuple[np.ndarray, np.ndarray]:
  """The null condition's encoder input: `negative_prompt` ("" for SANA) without the
  instruction, (B, max_sequence_length) ids and mask."""
  return tokenize(tokenizer, [negative_prompt] * batch_size, instruction=None,
                  max_sequence_length=max_sequence_length)


def select_index(max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> np.ndarray:
  """[0] + range(-(max_sequence_length - 1), 0): BOS and the last max_sequence_length - 1."""
  return np.array([0] + list(range(-max_sequence_length + 1, 0)), np.int32)


def select(x: Any, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Any:
  """x (B, L, ...) -> (B, max_sequence_length, ...): BOS and the last positions (step 5).

  Works on numpy and JAX arrays alike (the encoder's hidden states, or the mask); for L =
  max_sequence_length (the negative prompt) it is the identity.
  """
  if x.shape[1] < max_sequence_length:
    raise ValueError(f"select: sequence of {x.shape[1]} positions, shorter than "
                     f"max_sequence_length={max_sequence_length}; tokenize with the same "
                     "max_sequence_length.")
  return x[:, select_index(max_sequence_length) % x.shape[1]]
