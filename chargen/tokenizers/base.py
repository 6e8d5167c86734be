"""The tokenizer interface: text <-> token ids, and the JSON description that carries a
tokenizer inside a model file.

Every part of the project that turns text into ids or ids into text (the encode stage,
training's word list, evaluation, export, the runtime and the CLI) goes through this
interface, so a new kind of tokenizer needs no change anywhere else. numpy and the
standard library only: the runtime uses it.
"""

from __future__ import annotations

import codecs
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from chargen.errors import ChargenError

EOT_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
REPLACEMENT = "\ufffd"  # what an unknown token or broken UTF-8 decodes to
UINT8_MAX_TOKENS = 256
UINT16_MAX_TOKENS = 65536


class TokenizerError(ChargenError, ValueError):
    """A tokenizer description is malformed, or token ids are out of range."""


def normalize_text(text: str, nfc: bool) -> str:
    """The one text normalisation of the project: ``\\r\\n`` and ``\\r`` line ends become
    ``\\n``, then (with ``nfc``) Unicode NFC. Training text and prompts alike."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text) if nfc else text


def without_surrogates(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD. A str may hold them (undecodable
    bytes of a command line, say) but they have no UTF-8 form, so tokenizers that work on
    UTF-8 bytes read them as the replacement character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def storage_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size <= UINT8_MAX_TOKENS:
        return np.dtype(np.uint8)
    if vocab_size <= UINT16_MAX_TOKENS:
        return np.dtype(np.uint16)
    raise TokenizerError(
        f"vocabulary has {vocab_size} tokens, more than {UINT16_MAX_TOKENS} fit in uint16; "
        "use a smaller vocabulary"
    )


class StreamDecoder:
    """Text of token ids as they come: ``push(id)`` returns the characters completed so
    far, holding back the bytes of a character that a later token finishes."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = pieces  # UTF-8 bytes of each token
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._pieces[token_id])

    def flush(self) -> str:
        """What is still held back, as U+FFFD if it never became a character."""
        return self._utf8.decode(b"", final=True)


class Tokenizer(ABC):
    """Token ids of text and text of token ids.

    Every tokenizer has an end-of-text token (``eot_id``), placed after each document
    in training so that the model learns to stop; ``unk_id`` is the token of text
    the vocabulary cannot represent, or None when every text is representable.
    """

    kind: ClassVar[str]

    def __init__(self, eot_id: int, unk_id: int | None, normalize_nfc: bool) -> None:
        self.eot_id = int(eot_id)
        self.unk_id = None if unk_id is None else int(unk_id)
        self.normalize_nfc = bool(normalize_nfc)

    # ------------------------------------------------------------------ description

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The JSON-able description stored in a model file; ``{"kind": ..., ...}``."""

    @classmethod
    @abstractmethod
    def from_description(cls, d: dict[str, Any]) -> Tokenizer:
        """Rebuild from :meth:`describe`'s output; TokenizerError when it is malformed."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash((self.kind, self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"

    # ------------------------------------------------------------------ sizes

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of token ids (the model's vocabulary size)."""

    def __len__(self) -> int:
        return self.size

    @property
    def dtype(self) -> np.dtype:
        """The dtype of token files for this vocabulary (uint8 or uint16)."""
        return storage_dtype(self.size)

    # ------------------------------------------------------------------ text -> ids

    def normalize(self, text: str) -> str:
        return normalize_text(text, self.normalize_nfc)

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids (T,) int64 of ``text`` after :meth:`normalize`."""

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of ``text`` that only the unknown token can represent, in
        order of first appearance (none for tokenizers without an unknown token)."""
        return []

    # ------------------------------------------------------------------ ids -> text

    @abstractmethod
    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each token stands for: ``b""`` for end-of-text, U+FFFD's bytes
        for the unknown token. A token may hold part of a character."""

    def chars_per_token(self) -> np.ndarray:
        """Characters each token adds to a text, (size,) int64: the bytes of its UTF-8 that
        start a character (a token that ends a character begun by an earlier token adds
        nothing for those bytes). The end-of-text token counts as one character, the end
        of its document, as it is one token of the character tokenizer. Over the ids of
        any valid text the sum is the text's length plus one per end-of-text token: the
        denominator of every per-character loss."""
        counts = [sum(1 for b in piece if b & 0xC0 != 0x80) for piece in self.token_bytes()]
        counts[self.eot_id] = 1
        return np.array(counts, dtype=np.int64)

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` as int64 (N,); TokenizerError for an id outside the vocabulary."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = ids[(ids < 0) | (ids >= self.size)][0]
            raise TokenizerError(f"token id {bad} is out of range for a vocabulary of {self.size}")
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray, eot: str = "") -> str:
        """Text of ``ids``; the end-of-text token becomes ``eot``, bytes that never form a
        character become U+FFFD."""
        ids = self.check_ids(ids)
        pieces = self.token_bytes()
        eot_bytes = eot.encode("utf-8")
        return b"".join(eot_bytes if i == self.eot_id else pieces[i] for i in ids.tolist()).decode(
            "utf-8", "replace"
        )

    def stream(self) -> StreamDecoder:
        """A decoder for text produced one token at a time."""
        return StreamDecoder(self.token_bytes())
