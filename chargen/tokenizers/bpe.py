"""The byte-level BPE tokenizer: byte-pair merges over UTF-8 bytes, with numpy and the
standard library only.

The training side learns the merges with Hugging Face ``tokenizers``
(``pipeline/tokens/bpe_train.py``); encoding here gives exactly the ids that its model gives,
because it repeats the same steps on the same description:

1. split the text into pieces with the description's regular expression, keeping the text
   between matches as pieces too (``tokenizers``' ``Split(..., behavior="isolated")``). The
   expression spells out its character classes as explicit code point ranges, so Python's
   ``re`` and Oniguruma cut the same pieces whatever Unicode version each one knows;
2. start each piece as one token per UTF-8 byte;
3. merge, always the lowest-ranked applicable pair and the leftmost one among equals, until
   no pair applies (``tokenizers``' ``Word::merge_all``).

Every text encodes (all 256 bytes are tokens: there is no unknown token). The end-of-text
token is never produced from text: its string encodes as plain text, as in the character
tokenizer; the pipeline places it by id.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping, Sequence
from itertools import chain, pairwise
from typing import Any

import numpy as np

from chargen.tokenizers.base import Tokenizer, TokenizerError, storage_dtype, without_surrogates

# Distinct pieces remembered between calls: the words of a long English text, without
# letting a large corpus grow the cache without bound.
CACHE_SIZE = 100_000
_NO_MERGE = (0, -1)  # (rank, merged id) of a pair without a merge: matches no id


class BPETokenizer(Tokenizer):
    """Byte-level BPE: the 256 bytes, tokens made by merges, and the end-of-text token."""

    kind = "bpe"

    def __init__(
        self,
        tokens: Sequence[bytes | None],
        merges: Sequence[tuple[int, int]],
        pattern: str | None,
        *,
        eot_id: int,
        normalize_nfc: bool = True,
    ) -> None:
        super().__init__(eot_id, None, normalize_nfc)
        self._token_bytes = _check_tokens(tokens, self.eot_id)
        storage_dtype(len(tokens))  # refuse vocabularies that no token file could store
        self.pattern = pattern
        self.merges = [(int(a), int(b)) for a, b in merges]
        ids_of = {t: i for i, t in enumerate(self._token_bytes) if t}
        self._byte_id = [ids_of[bytes([b])] for b in range(256)]  # per-piece loop
        self._byte_ids = np.array(self._byte_id, dtype=np.int64)  # whole-text fast path
        self._ranks = _merge_table(self.merges, self._token_bytes, ids_of)
        self._splitter = _compile(pattern)
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ description

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "eot_id": self.eot_id,
            "normalize_nfc": self.normalize_nfc,
            "pattern": self.pattern,
            # hex: a token may be part of a multi-byte character, which no JSON string holds
            "tokens": [t.hex() if t else None for t in self._token_bytes],
            "merges": [list(pair) for pair in self.merges],
        }

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> BPETokenizer:
        if not _is_id(d.get("eot_id")):
            raise TokenizerError("bpe tokenizer: 'eot_id' must be an integer token id")
        if not isinstance(d.get("normalize_nfc"), bool):
            raise TokenizerError("bpe tokenizer: 'normalize_nfc' must be true or false")
        if "pattern" not in d or not isinstance(d["pattern"], str | None):
            raise TokenizerError("bpe tokenizer: 'pattern' must be a string or null")
        tokens, merges = d.get("tokens"), d.get("merges")
        if not isinstance(tokens, list) or not all(isinstance(t, str | None) for t in tokens):
            raise TokenizerError("bpe tokenizer: 'tokens' must be a list of hex strings (null: end-of-text)")
        if not isinstance(merges, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(map(_is_id, m)) for m in merges
        ):
            raise TokenizerError("bpe tokenizer: 'merges' must be a list of [left id, right id] pairs")
        try:
            token_bytes = [None if t is None else bytes.fromhex(t) for t in tokens]
        except ValueError as e:
            raise TokenizerError(f"bpe tokenizer: a token is not hex ({e})") from None
        return cls(token_bytes, [tuple(m) for m in merges], d["pattern"], eot_id=d["eot_id"],
                   normalize_nfc=d["normalize_nfc"])

    @property
    def size(self) -> int:
        return len(self._token_bytes)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> np.ndarray:
        """Token ids (T,) int64 of ``text`` after :meth:`normalize`; lone surrogates
        encode as U+FFFD."""
        text = self.normalize(without_surrogates(text))
        if not self._ranks:  # no merges (a corpus that repeats no pair): one token per byte
            return self._byte_ids[np.frombuffer(text.encode(), dtype=np.uint8)]
        pieces = self.split(text)
        cache = self._cache
        todo = set(pieces).difference(cache)
        if len(cache) + len(todo) > CACHE_SIZE:
            cache.clear()
            todo = set(pieces)
        for piece in todo:
            cache[piece] = self.merge(piece.encode())
        return np.fromiter(chain.from_iterable(map(cache.__getitem__, pieces)), dtype=np.int64)

    def split(self, text: str) -> list[str]:
        """The pieces merges stay within: every match and every stretch between matches."""
        if self._splitter is None:
            return [text] if text else []
        # The pattern is wrapped in one group, so re.split returns the gaps and the matches
        # in order; empty gaps are dropped, as `tokenizers` drops them.
        return list(filter(None, self._splitter.split(text)))

    def merge(self, data: bytes) -> list[int]:
        """Ids of one piece: its bytes, merged lowest rank first, leftmost among equals.

        A heap of (rank, position, merged id) over a linked list of symbols keeps long
        pieces (runs of spaces, unspaced scripts) O(n log n). An entry goes stale when a
        neighbour merges first; it is recognised because the pair now at its position
        merges into another id (the pair spans more bytes than when it was queued).
        """
        ids = [self._byte_id[b] for b in data]
        ranks = self._ranks
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = [(m[0], i, m[1]) for i, m in enumerate(map(ranks.get, pairwise(ids))) if m]
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] < 0 or j >= n or ranks.get((ids[i], ids[j]), _NO_MERGE)[1] != new:
                continue
            ids[i], ids[j] = new, -1
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
            h = prv[i]
            if h >= 0 and (m := ranks.get((ids[h], new))):
                heapq.heappush(heap, (m[0], h, m[1]))
            if k < n and (m := ranks.get((new, ids[k]))):
                heapq.heappush(heap, (m[0], i, m[1]))
        return [t for t in ids if t >= 0]

    # ------------------------------------------------------------------ decoding

    def token_bytes(self) -> list[bytes]:
        return self._token_bytes


# ---------------------------------------------------------------------- building


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tokens(tokens: Sequence[bytes | None], eot_id: int) -> list[bytes]:
    """Bytes per id (b"" for the end-of-text token): every byte value has a token of its
    own, else some text could not be encoded; no bytes stand for two ids."""
    if not 0 <= eot_id < len(tokens) or tokens[eot_id] is not None:
        raise TokenizerError(f"bpe tokenizer: eot_id {eot_id} must be the id of a token without bytes")
    seen: set[bytes] = set()
    for i, t in enumerate(tokens):
        if i == eot_id:
            continue
        if not isinstance(t, bytes) or not t:
            raise TokenizerError(f"bpe tokenizer: token {i} must be non-empty bytes, got {t!r}")
        if t in seen:
            raise TokenizerError(f"bpe tokenizer: bytes {t.hex()} appear twice")
        seen.add(t)
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise TokenizerError(f"bpe tokenizer: no token for byte {missing[0]:#04x}")
    return [t or b"" for t in tokens]


def _merge_table(
    merges: Sequence[tuple[int, int]], token_bytes: Sequence[bytes], ids_of: Mapping[bytes, int]
) -> dict[tuple[int, int], tuple[int, int]]:
    """(left id, right id) -> (rank, merged id). The merged id is the token of the joined
    bytes; a pair listed twice keeps its last rank, as in `tokenizers`."""
    table: dict[tuple[int, int], tuple[int, int]] = {}
    for rank, (a, b) in enumerate(merges):
        if not (0 <= a < len(token_bytes) and 0 <= b < len(token_bytes)):
            raise TokenizerError(f"bpe tokenizer: merge {rank} names an id outside the vocabulary")
        left, right = token_bytes[a], token_bytes[b]
        merged = ids_of.get(left + right) if left and right else None  # never the end-of-text
        if merged is None:
            raise TokenizerError(f"bpe tokenizer: merge {rank} ({a}, {b}) makes no token of the vocabulary")
        table[a, b] = (rank, merged)
    return table


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        splitter = re.compile(f"({pattern})")
    except re.error as e:
        raise TokenizerError(f"bpe tokenizer: bad split pattern ({e})") from None
    if splitter.groups != 1:  # other groups would add their captures to the pieces
        raise TokenizerError("bpe tokenizer: the split pattern must not capture; use (?:...)")
    return splitter
