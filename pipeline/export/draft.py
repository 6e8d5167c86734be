"""Building the draft table (``chargen.draft``) from the training split.

For every context of ``context`` tokens the table keeps the token that most often
follows it; contexts share one of ``2 ** bits`` buckets (``chargen.draft.context_buckets``),
and a bucket keeps the next token most frequent over all its contexts, if it followed them
at least ``min_count`` times: a guess seen once or twice is rarely confirmed, and buckets
that guess nothing compress better. Shapes: N tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chargen.draft import NGramDraft, context_buckets, no_guess, table_dtype
from pipeline.tokens.splits import read_split


def build_draft(ids: np.ndarray, vocab_size: int, context: int, bits: int, min_count: int = 1) -> NGramDraft:
    """The draft table of a token array (N,); buckets whose most frequent next token
    followed them fewer than ``min_count`` times (or never) guess nothing."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    ids = np.asarray(ids, dtype=np.int64)
    dtype = table_dtype(vocab_size)
    table = np.full(1 << bits, no_guess(dtype), dtype=dtype)
    if ids.size > context:
        buckets = context_buckets(ids[:-1], context, vocab_size, bits).astype(np.int64)  # (N - context,)
        pairs, counts = np.unique(buckets * vocab_size + ids[context:], return_counts=True)
        bucket, nxt = pairs // vocab_size, pairs % vocab_size
        order = np.lexsort((-counts, bucket))  # per bucket, the most frequent next token first
        first = np.ones(order.size, dtype=bool)
        first[1:] = bucket[order][1:] != bucket[order][:-1]
        keep = first & (counts[order] >= min_count)
        table[bucket[order][keep]] = nxt[order][keep]
    return NGramDraft(table, context, vocab_size)


def train_draft(
    encoded_dir: str | Path, vocab_size: int, context: int, bits: int, min_count: int = 1
) -> NGramDraft | None:
    """The export stage's table: the encoded train split's, or None when ``context`` is 0."""
    if not context:
        return None
    return build_draft(read_split(encoded_dir, "train"), vocab_size, context, bits, min_count)
