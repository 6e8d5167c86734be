"""The byte tokenizer: one token per UTF-8 byte, vectorised with numpy.

Ids 0-255 are the byte values, id 256 the end-of-text token. Every text is representable
(there is no unknown token); a character outside ASCII takes two to four tokens, so a
token may end in the middle of a character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from chargen.tokenizers.base import Tokenizer, TokenizerError, without_surrogates

N_BYTES = 256


class ByteTokenizer(Tokenizer):
    """The 256 byte values in byte order, then the end-of-text token."""

    kind = "byte"

    def __init__(self, *, normalize_nfc: bool = True) -> None:
        super().__init__(N_BYTES, None, normalize_nfc)
        self._pieces = [bytes([b]) for b in range(N_BYTES)] + [b""]

    # ------------------------------------------------------------------ description

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "eot_id": self.eot_id, "normalize_nfc": self.normalize_nfc}

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> ByteTokenizer:
        if d.get("eot_id") != N_BYTES or isinstance(d.get("eot_id"), bool):
            raise TokenizerError(f"byte tokenizer: 'eot_id' must be {N_BYTES}, after the byte values")
        if not isinstance(d.get("normalize_nfc"), bool):
            raise TokenizerError("byte tokenizer: 'normalize_nfc' must be true or false")
        return cls(normalize_nfc=d["normalize_nfc"])

    @property
    def size(self) -> int:
        return N_BYTES + 1

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` after :meth:`normalize`; lone surrogates encode as U+FFFD."""
        data = self.normalize(without_surrogates(text)).encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def token_bytes(self) -> list[bytes]:
        return self._pieces

    def decode(self, ids: Sequence[int] | np.ndarray, eot: str = "") -> str:
        ids = self.check_ids(ids)
        # Every segment after the first starts with an end-of-text token.
        segments = np.split(ids, np.flatnonzero(ids == self.eot_id))
        data = [segments[0]] + [s[1:] for s in segments[1:]]
        joined = eot.encode("utf-8").join(s.astype(np.uint8).tobytes() for s in data)
        return joined.decode("utf-8", "replace")
