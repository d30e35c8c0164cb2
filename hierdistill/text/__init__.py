"""Text side of text-to-image: prompts to the token ids and masks the frozen encoders read.

  sana_prompts.py   SANA's prompt preparation for its Gemma-2 encoder (models/gemma2.py): the
                    complex human instruction, 300-token right padding, BOS + last 299 positions
  clip_prompts.py   CLIP's 77-token ids (start, BPE tokens truncated to 75, end, zeros) for the
                    CLIP score (models/clip.py)
Both read the tokenizer.json published with the weights through the `tokenizers` package
(tokenizer_file.py).
"""
