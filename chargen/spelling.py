"""Spelling rate: how many words of generated text occur in the training text (stdlib only).

A word is a run of letters, optionally joined by apostrophes ("o'er", "'tis" counts
as "tis"), compared in lower case: ``WORD_RE`` below. The spelling rate of some
samples is the share of their words that occur in the training split's word list.
A sample is cut at a fixed number of characters, so its last word is counted only
when something other than a letter follows it (a cut-off word is not a misspelling).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD_RE = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
# Words of at least this many letters are rarely right by chance: a second spelling
# rate counts only them.
LONG_WORD = 4


def words_of(text: str) -> list[str]:
    """The lower-cased words of ``text`` by ``WORD_RE``."""
    return WORD_RE.findall(text.lower())


def counted_words(text: str) -> list[str]:
    """Words of one sample, without a last word that the sample's end may have cut."""
    lowered = text.lower()
    matches = list(WORD_RE.finditer(lowered))
    if matches and matches[-1].end() == len(lowered):
        matches.pop()
    return [m.group(0) for m in matches]


def spelling_rate(texts: Iterable[str], words: set[str], min_letters: int = 1) -> float:
    """Share of the samples' words of at least ``min_letters`` letters found in ``words``;
    0.0 when there are no such words. Short words are often right by chance; from four
    letters on, chance is near zero."""
    total = known = 0
    for text in texts:
        for w in counted_words(text):
            if len(w) - w.count("'") - w.count("\u2019") < min_letters:
                continue
            total += 1
            known += w in words
    return known / total if total else 0.0
