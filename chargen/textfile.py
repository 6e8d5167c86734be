"""Reading a long UTF-8 text in pieces that encode as the whole text would.

A piece ends just before its last line end that follows a printable ASCII character
other than a space: text is NFC-normalised piece by piece and no character composes
with a line end, and every tokenizer starts a new token there (a byte-level BPE's
pre-tokenizer always splits between such a character and the whitespace run after it),
so the pieces' encodings concatenate to the whole text's. Memory is bounded by the piece size and by
the longest stretch of text without such a line end. Line ends (``\\r\\n``, ``\\r``) are
unified by the reader, across pieces too.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

from chargen.errors import ChargenError

PIECE_CHARS = 1 << 16  # characters read at a time: a second or two of scoring


class TextSource:
    """A UTF-8 byte stream read as text pieces; ``bytes_read`` and ``size`` (None when
    unknown, e.g. a pipe) drive a progress bar."""

    def __init__(self, raw: BinaryIO, name: str) -> None:
        self.raw, self.name = raw, name
        try:
            st = os.fstat(raw.fileno())  # a file given by name, or redirected to stdin (< FILE)
            self.size: int | None = st.st_size if st.st_size and stat.S_ISREG(st.st_mode) else None
        except (OSError, AttributeError, io.UnsupportedOperation):
            self.size = None

    @property
    def bytes_read(self) -> int:
        try:
            return self.raw.tell()
        except (OSError, io.UnsupportedOperation):
            return 0

    def pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
        text = io.TextIOWrapper(self.raw, encoding="utf-8", newline=None)  # universal newlines
        carry = ""
        while True:
            try:
                new = text.read(piece_chars)
            except UnicodeDecodeError:
                raise ChargenError(f"{self.name} is not UTF-8 text; convert it first (e.g. iconv -t utf-8)") from None
            except OSError as e:  # e.g. EIO: said here, or it would read as a failure to write the output
                raise ChargenError(f"cannot read {self.name} ({e.strerror})") from None
            if not new:
                break
            carry += new
            cut = _safe_cut(carry)
            if cut:
                yield carry[:cut]
                carry = carry[cut:]
        if carry:
            yield carry


def _safe_cut(text: str) -> int:
    """Where ``text`` may end a piece: before its last line end that follows a printable
    ASCII character other than a space (0: nowhere yet)."""
    cut = text.rfind("\n")
    while cut > 0 and not "!" <= text[cut - 1] <= "~":
        cut = text.rfind("\n", 0, cut - 1)
    return max(cut, 0)
