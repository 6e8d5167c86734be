"""The character vocabulary: token ids <-> characters, vectorised with numpy.

Ids 0 and 1 are the end-of-text and unknown tokens; every other token is one
character, in code-point order. The same class tokenizes prompts at inference
time from the vocab stored in the ONNX metadata, so this module imports only the
standard library and numpy.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import ChargenError

EOT_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
MAX_CODEPOINT = 0x10FFFF
UINT8_MAX_TOKENS = 256
UINT16_MAX_TOKENS = 65536


class VocabError(ChargenError, ValueError):
    """A vocabulary dict is malformed or ids are out of range."""


def codepoints(text: str) -> np.ndarray:
    """The code points of ``text`` as a uint32 array (one copy, no Python loop)."""
    # surrogatepass: a str may hold lone surrogates; they become unknown tokens
    # instead of an encoding error.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def storage_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size <= UINT8_MAX_TOKENS:
        return np.dtype(np.uint8)
    if vocab_size <= UINT16_MAX_TOKENS:
        return np.dtype(np.uint16)
    raise VocabError(
        f"vocabulary has {vocab_size} tokens, more than {UINT16_MAX_TOKENS} fit in uint16; "
        "raise encode.min_char_count to map rare characters to the unknown token"
    )


class Vocab:
    """An ordered character vocabulary with an end-of-text and an unknown token."""

    def __init__(
        self,
        tokens: Sequence[str],
        counts: Sequence[int] | None = None,
        *,
        eot_id: int = 0,
        unk_id: int = 1,
        normalize_nfc: bool = True,
        min_char_count: int = 1,
    ) -> None:
        tokens = list(tokens)
        counts = [0] * len(tokens) if counts is None else [int(c) for c in counts]
        if len(counts) != len(tokens):
            raise VocabError(f"vocab: {len(tokens)} tokens but {len(counts)} counts")
        for name, i in (("eot_id", eot_id), ("unk_id", unk_id)):
            if not 0 <= i < len(tokens):
                raise VocabError(f"vocab: {name} {i} is not a token id (size {len(tokens)})")
        if eot_id == unk_id:
            raise VocabError("vocab: eot_id and unk_id must differ")
        seen: set[str] = set()
        for i, tok in enumerate(tokens):
            if i in (eot_id, unk_id):
                continue
            if not isinstance(tok, str) or len(tok) != 1:
                raise VocabError(f"vocab: token {i} must be a single character, got {tok!r}")
            if tok in seen:
                raise VocabError(f"vocab: character {tok!r} appears twice")
            seen.add(tok)
        storage_dtype(len(tokens))  # refuse vocabularies that no split file could store

        self.tokens = tokens
        self.counts = counts
        self.eot_id = int(eot_id)
        self.unk_id = int(unk_id)
        self.normalize_nfc = bool(normalize_nfc)
        self.min_char_count = int(min_char_count)

        # id -> code point (specials marked separately) for vectorised decoding
        self._is_special = np.zeros(len(tokens), dtype=bool)
        self._is_special[[self.eot_id, self.unk_id]] = True
        self._codepoints = np.array(
            [0 if self._is_special[i] else ord(t) for i, t in enumerate(tokens)], dtype="<u4"
        )
        self._table: np.ndarray | None = None

    # ------------------------------------------------------------------ serialisation

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        """Rebuild a vocabulary from its ``vocab.json`` / ONNX-metadata form."""
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
            raise VocabError("vocab: expected a mapping with a 'tokens' list")
        try:
            return cls(
                d["tokens"],
                d.get("counts"),
                eot_id=int(d.get("eot_id", 0)),
                unk_id=int(d.get("unk_id", 1)),
                normalize_nfc=bool(d.get("normalize_nfc", True)),
                min_char_count=int(d.get("min_char_count", 1)),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, VocabError):
                raise
            raise VocabError(f"vocab: malformed ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "counts": list(self.counts),
            "eot_id": self.eot_id,
            "unk_id": self.unk_id,
            "normalize_nfc": self.normalize_nfc,
            "min_char_count": self.min_char_count,
        }

    @classmethod
    def from_char_counts(
        cls,
        char_counts: np.ndarray,
        *,
        eot_count: int = 0,
        min_char_count: int = 1,
        normalize_nfc: bool = True,
    ) -> Vocab:
        """Build from per-code-point counts (index = code point).

        Characters seen fewer than ``min_char_count`` times are dropped; their
        occurrences are counted against the unknown token.
        """
        char_counts = np.asarray(char_counts, dtype=np.int64)
        kept = np.flatnonzero(char_counts >= min_char_count)
        rare = (char_counts > 0) & (char_counts < min_char_count)
        tokens = [EOT_TOKEN, UNK_TOKEN] + [chr(c) for c in kept]
        counts = [int(eot_count), int(char_counts[rare].sum())] + char_counts[kept].tolist()
        return cls(tokens, counts, normalize_nfc=normalize_nfc, min_char_count=min_char_count)

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def dtype(self) -> np.dtype:
        """The dtype split files use for this vocabulary (uint8 or uint16)."""
        return storage_dtype(self.size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocab(size={self.size}, normalize_nfc={self.normalize_nfc})"

    # ------------------------------------------------------------------ encoding

    @property
    def table(self) -> np.ndarray:
        """Dense code point -> id lookup over all of Unicode (1-2 MB, built once)."""
        if self._table is None:
            table = np.full(MAX_CODEPOINT + 1, self.unk_id, dtype=self.dtype)
            ids = np.flatnonzero(~self._is_special)
            table[self._codepoints[ids]] = ids
            self._table = table
        return self._table

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.normalize_nfc else text

    def lookup(self, cps: np.ndarray) -> np.ndarray:
        """Ids (storage dtype) of already-normalized code points; unknown -> ``unk_id``."""
        return self.table[cps]

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of ``text``; characters outside the vocabulary map to ``unk_id``."""
        return self.lookup(codepoints(self.normalize(text))).astype(np.int64)

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of ``text`` (after normalization) not in the vocabulary,
        in order of first appearance."""
        cps = codepoints(self.normalize(text))
        unknown = cps[self.lookup(cps) == self.unk_id]
        uniq, first = np.unique(unknown, return_index=True)
        return [chr(c) for c in uniq[np.argsort(first)]]

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int] | np.ndarray, eot: str = "", unk: str = "\ufffd") -> str:
        """Text of ``ids``. The end-of-text token becomes ``eot`` (default: nothing) and
        the unknown token ``unk`` (default: U+FFFD)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = ids[(ids < 0) | (ids >= self.size)][0]
            raise VocabError(f"token id {bad} is out of range for a vocabulary of {self.size}")
        special = np.flatnonzero(self._is_special[ids])
        if not special.size:
            return self._chars(ids)
        # Decode the plain runs in one go each; only the specials are handled one by one.
        parts: list[str] = []
        start = 0
        for pos in special.tolist():
            parts.append(self._chars(ids[start:pos]))
            parts.append(eot if ids[pos] == self.eot_id else unk)
            start = pos + 1
        parts.append(self._chars(ids[start:]))
        return "".join(parts)

    def _chars(self, ids: np.ndarray) -> str:
        return self._codepoints[ids].tobytes().decode("utf-32-le", "surrogatepass")
