"""The draft table: a cheap guess of the next tokens, so that one model call checks several.

Generating one token per session call pays the graph's fixed cost for every character.
With a draft, the decoder feeds the token it just drew together with the table's guesses
of the tokens after it; the logits of every fed position come back from that one call.
The model's own draw at each guessed position, made with the next number of the ordinary
random stream, either equals the guess (the guess is kept and the next position's logits
are already there) or is the emitted token (the rest is dropped). Every token is drawn
from the model's distribution given the text before it, with the number it would have
without a draft; the table only decides how many positions one call computes. In fp32
the text is the same token for token; int8 quantizes the activations of one call's
tokens with one scale, so its logits, and in time its text, move within quantization
noise.

The table is the most frequent next token after each context of the last ``context``
tokens in the training text, hashed into ``2 ** bits`` buckets and stored compressed
(zlib, then base64) so that it stays a few tens of kilobytes inside the model file
(``chargen.contract.META_DRAFT``).
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np

HASH_MULT = 2654435761  # Knuth's multiplicative hash: spreads the context index over the buckets
INDEX_MASK = 0xFFFFFFFF  # the context index is kept modulo 2**32


MAX_BITS = 24  # a table of 2**24 entries is already far larger than any model file should carry


def table_dtype(vocab_size: int) -> np.dtype:
    """uint8 when every id and the "no guess" entry fit in a byte, else uint16."""
    if vocab_size > 65535:
        raise ValueError(f"a draft table holds ids below 65535, the vocabulary has {vocab_size}")
    return np.dtype(np.uint8) if vocab_size < 256 else np.dtype(np.uint16)


def no_guess(dtype: np.dtype) -> int:
    """The table entry that stands for "no guess": the dtype's largest value, never an id."""
    return int(np.iinfo(dtype).max)


def context_buckets(ids: np.ndarray, context: int, vocab_size: int, bits: int) -> np.ndarray:
    """The bucket of every context in ids (N,): entry i hashes ids[i : i + context], (N - context + 1,)."""
    ids = np.asarray(ids, dtype=np.uint64)
    n = ids.size - context + 1
    index = np.zeros(max(n, 0), dtype=np.uint64)
    for j in range(context):
        index = (index * np.uint64(vocab_size) + ids[j : j + n]) & np.uint64(INDEX_MASK)
    return ((index * np.uint64(HASH_MULT)) & np.uint64(INDEX_MASK)) >> np.uint64(32 - bits)


def _unpack(data: bytes, encoding: Any, dtype: np.dtype) -> bytes:
    """The table's bytes from their stored form: "zlib", or raw bytes when no encoding is named."""
    if encoding is None:
        return data
    if encoding != "zlib":
        raise ValueError(f"the draft table's encoding {encoding!r} is not zlib")
    limit = (1 << MAX_BITS) * dtype.itemsize  # a larger table is refused, not inflated
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(data, limit)
    except zlib.error as e:
        raise ValueError(f"the draft table is not valid zlib data ({e})") from None
    if inflate.unconsumed_tail or not inflate.eof:
        raise ValueError("the draft table is truncated or larger than any table may be")
    return raw


class NGramDraft:
    """Bucket of the last ``context`` tokens -> the guessed next token (``none`` for no guess)."""

    def __init__(self, table: np.ndarray, context: int, vocab_size: int) -> None:
        bits = int(table.size).bit_length() - 1
        if context < 1 or table.ndim != 1 or table.size != 1 << bits or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"the draft table must hold 2**bits entries (1 <= bits <= {MAX_BITS}) "
                             "for a context >= 1")
        self.table, self.context, self.bits, self.vocab_size = table, context, bits, vocab_size
        self.none = no_guess(table.dtype)
        self._list = table.tolist()  # Python ints: a list lookup is the fastest per token

    def describe(self) -> dict[str, Any]:
        """The JSON object stored in the model file: the table's bytes zlib-compressed (most
        buckets guess nothing or repeat a common letter), then base64."""
        packed = zlib.compress(self.table.tobytes(), 9)
        return {"context": self.context, "bits": self.bits, "dtype": self.table.dtype.name,
                "encoding": "zlib", "table": base64.b64encode(packed).decode("ascii")}

    @classmethod
    def from_description(cls, d: Any, vocab_size: int) -> NGramDraft:
        """The table of a model file; ValueError if the description is malformed."""
        if not isinstance(d, dict) or not isinstance(d.get("context"), int) or not isinstance(d.get("table"), str):
            raise ValueError("the draft is not an object with an integer context and a table")
        dtype = table_dtype(vocab_size)
        if d.get("dtype") != dtype.name:
            raise ValueError(f"the draft table is {d.get('dtype')}, expected {dtype.name} for {vocab_size} tokens")
        table = np.frombuffer(_unpack(base64.b64decode(d["table"], validate=True), d.get("encoding"), dtype),
                              dtype=dtype)
        if d.get("bits") != int(table.size).bit_length() - 1:
            raise ValueError("the draft table's size does not match its bits")
        if ((table >= vocab_size) & (table != no_guess(dtype))).any():
            raise ValueError("the draft table guesses ids outside the vocabulary")
        return cls(table, d["context"], vocab_size)

    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to ``k`` guessed ids after ``history`` (ids, newest last). A history shorter
        than ``context`` hashes as if id 0 came before it: a guess all the same."""
        V, c, shift, table, none = self.vocab_size, self.context, 32 - self.bits, self._list, self.none
        recent = history[-c:]
        out: list[int] = []
        for _ in range(k):
            index = 0
            for t in recent:
                index = (index * V + t) & INDEX_MASK
            guess = table[((index * HASH_MULT) & INDEX_MASK) >> shift]
            if guess == none:
                break
            out.append(guess)
            recent = recent[1:] + [guess]
        return out
