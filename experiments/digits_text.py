"""The text-to-image miniature: 8x8 digits with captions measured from their pixels ("a bold,
right-leaning seven"), read by a DiT with cross-attention; no download.

The same chain as digits.py (teacher, stage 1, stage 2, eval) with a text condition: captions
are encoded once by the frozen word encoder that ships with the project (data/digits_text.py),
dropped to the empty prompt with probability model.class_dropout_prob while the teacher trains,
and classifier-free guidance runs against the empty prompt. The eval adds caption agreement:
the share of samples whose measured stroke and slant are the words asked for.
Variants (the arg after the colon): 'tiny' shrinks every stage to a few steps, for tests.
"""
from experiments import digits
from hierdistill.data import digits_text


def get_config(arg=None):
  c = digits.get_config(arg)
  c.name = "digits_text"
  c.data.name = "digits8x8_text"
  # A text DiT: no label table; each block reads the caption tokens by cross-attention.
  c.model.caption_channels = digits_text.ENCODER_WIDTH
  # Rows of 8 samples sharing a caption, one row per digit (sources/digits_text.py).
  c.sample.grid_size = 80 if arg != "tiny" else 16
  return c
