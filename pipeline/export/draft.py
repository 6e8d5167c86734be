"""Building the draft table (``chargen.draft``) from the training split.

For every context of ``context`` tokens the table keeps the token that most often
follows it; contexts share one of ``2 ** bits`` buckets (``chargen.draft.context_buckets``),
and a bucket keeps the next token most frequent over all its contexts. Shapes: N tokens.
"""

from __future__ import annotations

import numpy as np

from chargen.draft import NGramDraft, context_buckets, table_dtype


def build_draft(ids: np.ndarray, vocab_size: int, context: int, bits: int) -> NGramDraft:
    """The draft table of a token array (N,); buckets no context reached guess nothing."""
    ids = np.asarray(ids, dtype=np.int64)
    dtype = table_dtype(vocab_size)
    table = np.full(1 << bits, np.iinfo(dtype).max, dtype=dtype)
    if ids.size > context:
        buckets = context_buckets(ids[:-1], context, vocab_size, bits).astype(np.int64)  # (N - context,)
        pairs, counts = np.unique(buckets * vocab_size + ids[context:], return_counts=True)
        bucket, nxt = pairs // vocab_size, pairs % vocab_size
        order = np.lexsort((-counts, bucket))  # per bucket, the most frequent next token first
        first = np.ones(order.size, dtype=bool)
        first[1:] = bucket[order][1:] != bucket[order][:-1]
        table[bucket[order][first]] = nxt[order][first]
    return NGramDraft(table, context, vocab_size)
