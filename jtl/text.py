"""The project's tokenizer and the digit caption templates behind CLIP/SigLIP on the digits.

Tokenizer: a fixed *word* vocabulary (`VOCAB`), chosen over byte-level tokens because every caption
is made from the templates below, so the vocabulary is closed and small (~60 ids) and a caption is
~6 tokens instead of ~30 bytes; the text tower stays tiny and its attention cheap. The vocabulary
holds every template word (held-out ones too: they exist as ids, but no training caption uses the
words only held-out templates have, so their embeddings stay at init, like a real unseen word), the
ten number words and the ten numerals. Conventions:

* Text is lower-cased and split on whitespace; a word not in `VOCAB` becomes `UNK_ID`.
* A caption is the word ids, then `EOS_ID`, then `PAD_ID` up to a fixed `max_len` (int32 [L]); the
  mask is `tokens != PAD_ID`. A caption longer than `max_len - 1` words is a ConfigError (never
  silently cut: the class word may be the last).
* `PAD_ID = 0`, so an all-zero row (the data pipeline's padding) is an empty caption.

Captions: `TEMPLATES` has 16 phrasings of a digit, `{word}` ("seven") or `{digit}` ("7"). The first
12 (`TRAIN_TEMPLATES`) caption training images; the last 4 (`HELD_OUT_TEMPLATES`, new phrasings
of both forms, one with a word no training caption has) are kept for zero-shot classification and
retrieval, as CLIP evaluates with prompts it was not trained on (Radford et al. 2021, Sec. 3.1.4).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jtl.errors import ConfigError

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TEMPLATES = (
    # Training captions.
    "a photo of the digit {word}",
    "a photo of the number {digit}",
    "handwritten {digit}",
    "{word}",
    "the number {word}",
    "a handwritten {word}",
    "the digit {digit}",
    "an image of a {digit}",
    "a scan of the digit {word}",
    "{digit}",
    "a small blurry {word}",
    "a picture of the number {digit}",
    # Held out: for zero-shot classification and retrieval only.
    "a drawing of the digit {word}",
    "an image of the number {word}",
    "a handwritten {digit}",
    "the written number {digit}",
)
NUM_TRAIN_TEMPLATES = 12
TRAIN_TEMPLATES = tuple(range(NUM_TRAIN_TEMPLATES))
HELD_OUT_TEMPLATES = tuple(range(NUM_TRAIN_TEMPLATES, len(TEMPLATES)))

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def _template_words() -> list[str]:
  words: list[str] = []
  for template in TEMPLATES:
    for word in template.split():
      if not word.startswith("{") and word not in words:
        words.append(word)
  return words


VOCAB = (PAD, EOS, UNK, *NUMBER_WORDS, *(str(d) for d in range(10)), *_template_words())
_IDS = {word: i for i, word in enumerate(VOCAB)}
# Longest caption in words, plus EOS.
MIN_MAX_LEN = max(len(t.split()) for t in TEMPLATES) + 1


def vocab_size() -> int:
  """Number of token ids (the text tower's embedding rows)."""
  return len(VOCAB)


def encode(text: str, max_len: int) -> np.ndarray:
  """int32 [max_len]: word ids, EOS, then PAD. ConfigError if it does not fit."""
  ids = [_IDS.get(word, UNK_ID) for word in text.lower().split()] + [EOS_ID]
  if len(ids) > max_len:
    raise ConfigError(f"caption {text!r} needs {len(ids)} tokens (with EOS) but max_len={max_len}; "
                      f"raise the text max_len (>= {len(ids)})")
  return np.asarray(ids + [PAD_ID] * (max_len - len(ids)), np.int32)


def decode(tokens: Sequence[int] | np.ndarray) -> str:
  """The words of a caption (up to EOS; PAD dropped)."""
  words = []
  for token in np.asarray(tokens).tolist():
    if token == EOS_ID:
      break
    if token != PAD_ID:
      words.append(VOCAB[token] if 0 <= token < len(VOCAB) else UNK)
  return " ".join(words)


def mask(tokens: np.ndarray) -> np.ndarray:
  """True at real tokens (words and EOS), False at padding."""
  return np.asarray(tokens) != PAD_ID


def caption(template: int, digit: int) -> str:
  """Template number `template` filled in for `digit` (0..9)."""
  if not 0 <= digit <= 9:
    raise ConfigError(f"captions exist for digits 0..9, got class {digit}; the clip objective and "
                      "the zero-shot evaluators need a digits dataset (sklearn_digits, "
                      "printed_digits)")
  return TEMPLATES[template].format(word=NUMBER_WORDS[digit], digit=digit)


def caption_table(templates: Sequence[int], classes: Sequence[int], max_len: int) -> np.ndarray:
  """int32 [T, C, L]: the caption of each template for each class (dataset class ids, 0..9)."""
  bad = [t for t in templates if not 0 <= t < len(TEMPLATES)]
  if bad or not templates:
    raise ConfigError(f"template indices {list(templates)} must be non-empty and in "
                      f"0..{len(TEMPLATES) - 1}")
  return np.stack([np.stack([encode(caption(t, int(c)), max_len) for c in classes])
                   for t in templates])
