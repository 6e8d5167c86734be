"""The training text's word list, against which the spelling rate checks generated words."""

from __future__ import annotations

from pathlib import Path

from chargen.spelling import words_of
from pipeline.tokens.splits import read_split, read_tokenizer


def training_words(encoded_dir: str | Path) -> set[str]:
    """The set of words (``chargen.spelling.WORD_RE``, lower case) in the training split.

    The end-of-text token decodes to a line break, so no word joins two documents.
    """
    tokenizer = read_tokenizer(encoded_dir)
    return set(words_of(tokenizer.decode(read_split(encoded_dir, "train"), eot="\n")))
