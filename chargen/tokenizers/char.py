"""The character tokenizer: one token per character, vectorised with numpy.

Ids 0 and 1 are the end-of-text and unknown tokens; every other token is one
character, in code-point order. Characters outside the table map to the unknown token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from chargen.tokenizers.base import (
    EOT_TOKEN,
    REPLACEMENT,
    UNK_TOKEN,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    storage_dtype,
)

MAX_CODEPOINT = 0x10FFFF


def codepoints(text: str) -> np.ndarray:
    """The code points of ``text`` as a uint32 array (one copy, no Python loop)."""
    # surrogatepass: a str may hold lone surrogates; they become unknown tokens
    # instead of an encoding error.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharStreamDecoder(StreamDecoder):
    """Every character token is a whole character: a list lookup per step."""

    def __init__(self, chars: Sequence[str]) -> None:
        self._chars = chars

    def push(self, token_id: int) -> str:
        return self._chars[token_id]

    def flush(self) -> str:
        return ""


class CharTokenizer(Tokenizer):
    """An ordered character table with an end-of-text and an unknown token."""

    kind = "char"

    def __init__(
        self, tokens: Sequence[str], *, eot_id: int = 0, unk_id: int = 1, normalize_nfc: bool = True
    ) -> None:
        tokens = list(tokens)
        for name, i in (("eot_id", eot_id), ("unk_id", unk_id)):
            if not isinstance(i, int) or not 0 <= i < len(tokens):
                raise TokenizerError(f"char tokenizer: {name} {i!r} is not a token id (size {len(tokens)})")
        if eot_id == unk_id:
            raise TokenizerError("char tokenizer: eot_id and unk_id must differ")
        seen: set[str] = set()
        for i, tok in enumerate(tokens):
            if i in (eot_id, unk_id):
                continue
            if not isinstance(tok, str) or len(tok) != 1:
                raise TokenizerError(f"char tokenizer: token {i} must be a single character, got {tok!r}")
            if tok in seen:
                raise TokenizerError(f"char tokenizer: character {tok!r} appears twice")
            seen.add(tok)
        storage_dtype(len(tokens))  # refuse vocabularies that no token file could store
        super().__init__(eot_id, unk_id, normalize_nfc)
        self.tokens = tokens

        # id -> code point (specials marked separately) for vectorised decoding
        self._is_special = np.zeros(len(tokens), dtype=bool)
        self._is_special[[self.eot_id, self.unk_id]] = True
        self._codepoints = np.array(
            [0 if self._is_special[i] else ord(t) for i, t in enumerate(tokens)], dtype="<u4"
        )
        self._table: np.ndarray | None = None

    # ------------------------------------------------------------------ description

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tokens": list(self.tokens),
            "eot_id": self.eot_id,
            "unk_id": self.unk_id,
            "normalize_nfc": self.normalize_nfc,
        }

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> CharTokenizer:
        if not isinstance(d.get("tokens"), list):
            raise TokenizerError("char tokenizer: expected a 'tokens' list")
        for key in ("eot_id", "unk_id"):
            if not isinstance(d.get(key), int) or isinstance(d.get(key), bool):
                raise TokenizerError(f"char tokenizer: '{key}' must be an integer token id")
        if not isinstance(d.get("normalize_nfc"), bool):
            raise TokenizerError("char tokenizer: 'normalize_nfc' must be true or false")
        return cls(d["tokens"], eot_id=d["eot_id"], unk_id=d["unk_id"], normalize_nfc=d["normalize_nfc"])

    @classmethod
    def from_char_counts(
        cls, char_counts: np.ndarray, *, min_char_count: int = 1, normalize_nfc: bool = True
    ) -> CharTokenizer:
        """Build from per-code-point counts (index = code point): every character seen at
        least ``min_char_count`` times gets a token; rarer ones map to the unknown token."""
        kept = np.flatnonzero(np.asarray(char_counts) >= min_char_count)
        return cls([EOT_TOKEN, UNK_TOKEN] + [chr(c) for c in kept], normalize_nfc=normalize_nfc)

    @property
    def size(self) -> int:
        return len(self.tokens)

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

    def lookup(self, cps: np.ndarray) -> np.ndarray:
        """Ids (storage dtype) of already-normalized code points; unknown -> ``unk_id``."""
        return self.table[cps]

    def encode(self, text: str) -> np.ndarray:
        return self.lookup(codepoints(self.normalize(text))).astype(np.int64)

    def unknown_chars(self, text: str) -> list[str]:
        cps = codepoints(self.normalize(text))
        unknown = cps[self.lookup(cps) == self.unk_id]
        uniq, first = np.unique(unknown, return_index=True)
        return [chr(c) for c in uniq[np.argsort(first)]]

    # ------------------------------------------------------------------ decoding

    def token_bytes(self) -> list[bytes]:
        return [piece.encode("utf-8", "surrogatepass") for piece in self._token_text()]

    def _token_text(self) -> list[str]:
        return ["" if i == self.eot_id else REPLACEMENT if i == self.unk_id else t
                for i, t in enumerate(self.tokens)]

    def stream(self) -> StreamDecoder:
        return CharStreamDecoder(self._token_text())

    def decode(self, ids: Sequence[int] | np.ndarray, eot: str = "") -> str:
        ids = self.check_ids(ids)
        special = np.flatnonzero(self._is_special[ids])
        if not special.size:
            return self._chars(ids)
        # Decode the plain runs in one go each; only the specials are handled one by one.
        parts: list[str] = []
        start = 0
        for pos in special.tolist():
            parts.append(self._chars(ids[start:pos]))
            parts.append(eot if ids[pos] == self.eot_id else REPLACEMENT)
            start = pos + 1
        parts.append(self._chars(ids[start:]))
        return "".join(parts)

    def _chars(self, ids: np.ndarray) -> str:
        return self._codepoints[ids].tobytes().decode("utf-32-le", "surrogatepass")
