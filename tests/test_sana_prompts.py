"""SANA's prompt preparation (text/sana_prompts.py) against a re-statement of SanaPipeline's logic.

The tokenizer is a tiny BPE trained here on the instruction and a few prompts, with Gemma's
special tokens (<pad> 0, <eos> 1, <bos> 2) and a post-processor that prepends <bos> as Gemma's
tokenizer.json does, so no download is needed; the pipeline's own steps are re-stated in
`_pipeline` (and, when transformers is installed, run through its tokenizer class).
"""
import inspect

import numpy as np
import pytest

from hierdistill.text import sana_prompts as sp

tokenizers = pytest.importorskip("tokenizers")

PROMPTS = ["  A Red Fox in the snow ", "", "a cat " * 200]  # plain, empty, longer than 300


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300,
                                special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(sp.COMPLEX_HUMAN_INSTRUCTION) + PROMPTS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                     special_tokens=[("<bos>", 2)])
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return str(path)


def _pipeline(tok, prompts, chi, max_sequence_length=300):
  """SanaPipeline._get_gemma_prompt_embeds' tokenization, then encode_prompt's select_index."""
  prompts = [p.lower().strip() for p in prompts]
  if chi:
    chi_prompt = "\n".join(chi)
    prompts = [chi_prompt + p for p in prompts]
    max_length = len(tok.encode(chi_prompt).ids) + max_sequence_length - 2
  else:
    max_length = max_sequence_length
  ids, mask = [], []
  for p in prompts:
    tokens = tok.encode(p).ids[:max_length]  # add_special_tokens=True; truncation keeps the head
    ids.append(tokens + [tok.token_to_id("<pad>")] * (max_length - len(tokens)))
    mask.append([1] * len(tokens) + [0] * (max_length - len(tokens)))
  select_index = [0] + list(range(-max_sequence_length + 1, 0))
  ids, mask = np.array(ids), np.array(mask)
  return ids, mask, ids[:, select_index], mask[:, select_index]


def test_prompts_with_the_instruction_match_the_pipeline(tokenizer_file):
  tok = sp.load_tokenizer(tokenizer_file)
  ids, mask = sp.tokenize(tok, PROMPTS)
  want_ids, want_mask, want_sel_ids, want_sel_mask = _pipeline(tok, PROMPTS,
                                                               sp.COMPLEX_HUMAN_INSTRUCTION)
  n_chi = sp.instruction_length(tok)
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == (3, n_chi + 298)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_array_equal(sp.select(ids), want_sel_ids)
  np.testing.assert_array_equal(sp.select(mask), want_sel_mask)
  assert sp.select(mask).shape == (3, 300) and sp.select(ids)[0, 0] == 2  # BOS kept
  assert mask[2].all() and not mask[1].all()  # the long prompt is truncated, the empty padded
  # What the selection keeps of a short prompt: its tokens follow the instruction's last ones.
  assert sp.select(mask)[1].sum() == 1 + 1 + (mask[1].sum() - n_chi)
  hidden = np.random.default_rng(0).standard_normal((3, ids.shape[1], 5))
  assert sp.select(hidden).shape == (3, 300, 5)


def test_negative_prompt_has_no_instruction_and_300_tokens(tokenizer_file):
  tok = sp.load_tokenizer(tokenizer_file)
  ids, mask = sp.tokenize_negative(tok, 2)
  want_ids, want_mask, _, _ = _pipeline(tok, ["", ""], None)
  assert ids.shape == (2, 300)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert mask.sum() == 2 and ids[0, 0] == 2 and (ids[:, 1:] == 0).all()
  np.testing.assert_array_equal(sp.select(ids), ids)  # identity at length 300


def test_bad_inputs_name_the_fix(tmp_path, tokenizer_file):
  with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*gemma-2-2b-it"):
    sp.load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match=r"list of prompts"):
    sp.tokenize(sp.load_tokenizer(tokenizer_file), "a fox")
  with pytest.raises(ValueError, match=r"shorter than max_sequence_length"):
    sp.select(np.zeros((1, 10)))


@pytest.mark.torch
def test_same_as_transformers_tokenizer_and_diffusers_instruction(tokenizer_file):
  transformers = pytest.importorskip("transformers")
  diffusers = pytest.importorskip("diffusers")
  default = inspect.signature(diffusers.SanaPipeline.__call__).parameters[
      "complex_human_instruction"].default
  assert tuple(default) == sp.COMPLEX_HUMAN_INSTRUCTION

  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, bos_token="<bos>",
                                            eos_token="<eos>", pad_token="<pad>",
                                            unk_token="<unk>")
  hf.padding_side = "right"
  chi_prompt = "\n".join(sp.COMPLEX_HUMAN_INSTRUCTION)
  max_length = len(hf.encode(chi_prompt)) + 300 - 2
  out = hf([chi_prompt + p.lower().strip() for p in PROMPTS], padding="max_length",
           max_length=max_length, truncation=True, add_special_tokens=True, return_tensors="np")
  ids, mask = sp.tokenize(sp.load_tokenizer(tokenizer_file), PROMPTS)
  np.testing.assert_array_equal(ids, out["input_ids"])
  np.testing.assert_array_equal(mask, out["attention_mask"])
