"""Text side of text-to-image: prompts to the token ids and masks the frozen encoders read.

  sana_prompts.py   SANA's prompt preparation for its Gemma-2 encoder (models/gemma2.py): the
                    complex human instruction, 300-token right padding, BOS + last 299 positions
"""
