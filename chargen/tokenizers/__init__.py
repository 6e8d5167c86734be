"""Tokenizers: text <-> token ids, rebuilt from the description stored in a model file.

``from_description`` is the one way to get a tokenizer from its JSON description
(``{"kind": "char" | "byte" | "bpe", ...}``), whichever part of the project asks.
"""

from __future__ import annotations

from typing import Any

from chargen.tokenizers.base import (
    EOT_TOKEN,
    UNK_TOKEN,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    normalize_text,
    storage_dtype,
)
from chargen.tokenizers.bpe import BPETokenizer
from chargen.tokenizers.byte import ByteTokenizer
from chargen.tokenizers.char import CharTokenizer

KINDS: dict[str, type[Tokenizer]] = {cls.kind: cls for cls in (CharTokenizer, ByteTokenizer, BPETokenizer)}

__all__ = [
    "EOT_TOKEN", "KINDS", "UNK_TOKEN", "BPETokenizer", "ByteTokenizer", "CharTokenizer",
    "StreamDecoder", "Tokenizer", "TokenizerError", "from_description", "normalize_text",
    "storage_dtype",
]


def from_description(d: Any) -> Tokenizer:
    """The tokenizer a description stands for; TokenizerError when it is malformed."""
    if not isinstance(d, dict):
        raise TokenizerError("tokenizer description: expected a JSON object")
    kind = d.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise TokenizerError(
            f"tokenizer kind {kind!r} is not one this chargen knows ({', '.join(KINDS)}); "
            "upgrade chargen or re-export the model"
        )
    return KINDS[kind].from_description(d)
