"""Spelling rate: how many words of generated text occur in the training text (stdlib + numpy).

A word is a run of letters, optionally joined by apostrophes ("o'er", "'tis" counts
as "tis"), compared in lower case: ``WORD_RE`` below. The spelling rate of some
samples is the share of their words that occur in the training split's word list.
A sample is cut at a fixed number of characters, so its last word is counted only
when something other than a letter follows it (a cut-off word is not a misspelling).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.batches import read_split
from pipeline.errors import ChargenError

WORD_RE = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")


def words_of(text: str) -> list[str]:
    """The lower-cased words of ``text`` by ``WORD_RE``."""
    return WORD_RE.findall(text.lower())


def decode_split(encoded_dir: str | Path, split: str = "train") -> str:
    """Decode one split file back to text; special tokens become a newline."""
    encoded_dir = Path(encoded_dir)
    ids = read_split(encoded_dir, split)
    try:
        vocab = json.loads((encoded_dir / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChargenError(f"{encoded_dir}/vocab.json: unreadable ({e}); run the encode stage") from None
    tokens = vocab["tokens"]
    specials = {vocab.get("eot_id", 0), vocab.get("unk_id", 1)}
    # One code point per id; a vectorised lookup decodes millions of ids in milliseconds.
    table = np.array(
        [ord("\n") if i in specials or len(t) != 1 else ord(t) for i, t in enumerate(tokens)],
        dtype=np.uint32,
    )
    if ids.size and int(ids.max()) >= len(table):
        raise ChargenError(f"{encoded_dir}/{split}.bin holds ids outside vocab.json; re-run encode")
    return table[ids].astype("<u4").tobytes().decode("utf-32-le")


def training_words(encoded_dir: str | Path) -> set[str]:
    """The set of words (``WORD_RE``, lower case) in the training split."""
    return set(words_of(decode_split(encoded_dir, "train")))


def counted_words(text: str) -> list[str]:
    """Words of one sample, without a last word that the sample's end may have cut."""
    lowered = text.lower()
    matches = list(WORD_RE.finditer(lowered))
    if matches and matches[-1].end() == len(lowered):
        matches.pop()
    return [m.group(0) for m in matches]


def spelling_rate(texts: Iterable[str], words: set[str]) -> float:
    """Share of the samples' words found in ``words``; 0.0 when there are no words."""
    total = known = 0
    for text in texts:
        for w in counted_words(text):
            total += 1
            known += w in words
    return known / total if total else 0.0
