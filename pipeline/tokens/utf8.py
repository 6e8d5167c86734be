"""Reading UTF-8 corpus files in chunks, and the numpy fast paths that count and encode them.

Files are read in pieces cut only where neither a UTF-8 sequence, a CRLF pair nor an
NFC composition can span the cut, so decoding and normalising the pieces one by one
equals doing it to the whole file, and memory stays flat whatever the file size.

Chunks that are plain valid UTF-8 (the common case) are counted and encoded with
numpy straight from the bytes; the rest are decoded and normalised through str
(:func:`decode_chunk`, the reference); both give the same characters.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from chargen.errors import ChargenError
from chargen.tokenizers import CharTokenizer, normalize_text
from chargen.tokenizers.char import MAX_CODEPOINT, codepoints

# A chunk is cut at a safe place found within its last CUT_WINDOW bytes; only text
# with no safe place for MAX_CARRY bytes (never seen in real text) is cut anywhere.
CUT_WINDOW = 64 * 1024
MAX_CARRY = 1024 * 1024
_NEVER_COMPOSES_BELOW = 0x300  # code points below U+0300 are NFC-stable starters
# Canonical pair decompositions all lie in planes 0-2 (plane 3 is CJK ideographs
# without decompositions, the rest unassigned, tags or private use).
_LAST_PAIR_DECOMPOSITION = 0x30000
# Chunks where more than 1 byte in _DENSE_MULTIBYTE starts a multi-byte character
# (non-Latin scripts) decode faster through str.
_DENSE_MULTIBYTE = 8
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes


class EncodeError(ChargenError):
    """The raw corpus is missing, empty or malformed."""


def iter_chunks(
    path: Path,
    chunk_bytes: int,
    normalize_nfc: bool,
    on_raw: Callable[[bytes], None] | None = None,
) -> Iterator[tuple[int, bytes]]:
    """``(file offset, raw bytes)`` pieces of a file, each about ``chunk_bytes`` long.

    Pieces are cut only where neither a UTF-8 sequence, a CRLF pair nor an NFC
    composition can span the cut, so decoding and normalising them one by one
    equals doing it to the whole file. The cuts depend only on the bytes, so both
    passes see the same pieces. ``on_raw`` sees every block read (for hashing).
    """
    carry = b""
    offset = 0  # file offset of the first byte of ``carry``
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if on_raw is not None and block:
                on_raw(block)
            data = carry + block if carry else block
            cut = len(data) if not block else _safe_cut(data, normalize_nfc)
            if cut:
                yield offset, data[:cut]
                offset += cut
            carry = data[cut:]
            if not block:
                return


def iter_text(
    path: Path,
    chunk_bytes: int,
    normalize_nfc: bool,
    on_raw: Callable[[bytes], None] | None = None,
) -> Iterator[str]:
    """The text of a UTF-8 file chunk by chunk: ``\\n`` line ends, NFC if asked."""
    for offset, raw in iter_chunks(path, chunk_bytes, normalize_nfc, on_raw):
        yield decode_chunk(raw, path, offset, normalize_nfc)


def decode_chunk(raw: bytes, path: Path, offset: int, normalize_nfc: bool) -> str:
    """One piece from :func:`iter_chunks` as text (the reference the fast paths match)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EncodeError(
            f"{path}: not valid UTF-8 at byte {offset + e.start}; "
            "convert the file to UTF-8 or fix the download source"
        ) from None
    return normalize_text(text, normalize_nfc)


def _safe_cut(data: bytes, normalize_nfc: bool) -> int:
    """Where to end this chunk (0: read more first)."""
    start = max(0, len(data) - CUT_WINDOW)
    nl = data.rfind(b"\n", start)
    if nl >= 0:  # after a newline: nothing composes with or reorders across it
        return nl + 1
    # Before an ASCII byte: a complete character that composes with nothing before it.
    tail = np.frombuffer(data, dtype=np.uint8, offset=start)
    ascii_at = np.flatnonzero(tail < 0x80)
    if ascii_at.size and start + int(ascii_at[-1]) > 0:
        return start + int(ascii_at[-1])
    last_char = len(data) - 1  # start of the last, possibly incomplete, UTF-8 sequence
    while last_char > 0 and data[last_char] & 0xC0 == 0x80:
        last_char -= 1
    if not normalize_nfc:
        return last_char
    cut = _nfc_boundary(data, start, last_char)
    if cut == 0 and len(data) > MAX_CARRY:
        return last_char
    return cut


def _nfc_boundary(data: bytes, start: int, end: int) -> int:
    """Byte offset in ``data[start:end]`` before a character NFC never joins to its left."""
    while start < end and data[start] & 0xC0 == 0x80:  # align to a character start
        start += 1
    # surrogateescape: one char per invalid byte keeps char and byte offsets in step
    # (the invalid bytes are reported when the chunk is decoded for real).
    text = data[start:end].decode("utf-8", "surrogateescape")
    for i in range(len(text) - 1, 0, -1):
        if _is_nfc_starter(text[i]):
            return start + len(text[:i].encode("utf-8", "surrogateescape"))
    return 0


# --------------------------------------------------------------------------- NFC facts


def _is_nfc_starter(ch: str) -> bool:
    """True when NFC cannot combine ``ch`` with, or reorder it before, the text to its left."""
    if ord(ch) < _NEVER_COMPOSES_BELOW:
        return True
    first = unicodedata.normalize("NFD", ch)[0]
    return (
        unicodedata.combining(ch) == 0
        and unicodedata.combining(first) == 0
        and ord(ch) not in _second_of_composition()
        and ord(first) not in _second_of_composition()
    )


@functools.lru_cache(maxsize=1)
def _second_of_composition() -> frozenset[int]:
    """Code points that canonical composition can attach to a preceding character."""
    seconds = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))  # Hangul V and T jamo
    for cp in range(_LAST_PAIR_DECOMPOSITION):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                seconds.add(int(parts[1], 16))
    return frozenset(seconds)


@functools.lru_cache(maxsize=1)
def _inert_flags() -> np.ndarray:
    """Per code point: 1 if NFC leaves it and its neighbours alone, 0 if not, -1 unknown."""
    return np.full(MAX_CODEPOINT + 1, -1, dtype=np.int8)


def _all_inert(cps: np.ndarray) -> bool:
    """True when text made of these code points is already NFC whatever their order."""
    flags = _inert_flags()
    looked_up = flags[cps]
    if (looked_up < 0).any():
        for cp in np.unique(cps[looked_up < 0]).tolist():
            ch = chr(cp)
            flags[cp] = _is_nfc_starter(ch) and unicodedata.is_normalized("NFC", ch)
        looked_up = flags[cps]
    return bool(looked_up.all())


# --------------------------------------------------------------------------- UTF-8 in numpy
#
# Most text is ASCII with a few multi-byte characters. For such chunks numpy reads
# the bytes directly, about twice as fast as decoding to str and back to code
# points. It is used only where it gives exactly what decode_chunk gives: valid
# UTF-8 (checked here), no CR to translate, and (with NFC) only characters NFC
# leaves alone. Anything else takes the str path.


def _multibyte_chars(u8: np.ndarray, n_cont: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Character index and code point of every multi-byte character in ``u8``.

    None when ``u8`` is not valid UTF-8, when multi-byte characters are so dense
    that decoding to str is faster, or when one starts in the last 3 bytes (rare:
    chunks end at a newline). ``n_cont`` is the number of continuation bytes
    (0x80-0xBF) in ``u8``.
    """
    pos = np.flatnonzero(u8 >= 0xC0)
    if len(pos) == 0:
        return (pos, pos.astype(np.uint32)) if n_cont == 0 else None
    if len(pos) * _DENSE_MULTIBYTE > len(u8) or pos[-1] > len(u8) - 4:
        return None
    # The 4 bytes from each lead byte as one big-endian word: one gather, not four.
    words = np.ndarray((len(u8) - 3,), dtype=">u4", buffer=u8, strides=(1,))
    w = words[pos].astype(np.uint32)
    extra = _LEAD_EXTRA[w >> 24]  # continuation bytes each lead claims (0: invalid lead)
    # Every claimed byte is a continuation byte and the claims add up to all of them,
    # so the claims are disjoint and cover every continuation byte: valid structure.
    if int(extra.sum()) != n_cont or not ((w & _CONT_MASK[extra]) == _CONT_BITS[extra]).all():
        return None
    x = w & _PAYLOAD_MASK[extra]  # drop the length and continuation marker bits
    cp = (x & 0x3F) | ((x >> 2) & 0xFC0) | ((x >> 4) & 0x3F000) | ((x >> 6) & 0x7C0000)
    cp >>= _UNUSED_BITS[extra]  # as if 4 bytes long; shift out the bytes not claimed
    if ((cp < _LOWEST[extra]) | ((cp >> 11) == 0x1B) | (cp > MAX_CODEPOINT)).any():
        return None  # overlong, surrogate or beyond Unicode
    # continuation bytes before each lead = its shift from byte index to character index
    char_index = pos - (np.cumsum(extra) - extra)
    return char_index, cp


# Tables indexed by a lead byte, or by its number of continuation bytes (0: invalid).
_LEAD_EXTRA = np.zeros(256, dtype=np.int64)
_LEAD_EXTRA[0xC0:0xE0], _LEAD_EXTRA[0xE0:0xF0], _LEAD_EXTRA[0xF0:0xF8] = 1, 2, 3
_CONT_MASK = np.array([0, 0xC00000, 0xC0C000, 0xC0C0C0], dtype=np.uint32)
_CONT_BITS = np.array([1, 0x800000, 0x808000, 0x808080], dtype=np.uint32)  # [0] never matches
_PAYLOAD_MASK = np.array([0, 0x1F3F0000, 0x0F3F3F00, 0x073F3F3F], dtype=np.uint32)
_UNUSED_BITS = np.array([0, 12, 6, 0], dtype=np.uint32)
_LOWEST = np.array([0, 0x80, 0x800, 0x10000], dtype=np.uint32)


def _byte_histogram(u8: np.ndarray) -> np.ndarray:
    """Counts of each byte value; bincount over byte pairs halves the work."""
    even = len(u8) & ~1
    pairs = np.bincount(u8[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
    hist = pairs.sum(axis=0) + pairs.sum(axis=1)
    if even != len(u8):
        hist[u8[-1]] += 1
    return hist


def count_chunk(raw: bytes, path: Path, offset: int, normalize_nfc: bool) -> tuple[int, np.ndarray]:
    """Characters in a chunk and their counts by code point, as :func:`decode_chunk` sees them."""
    if b"\r" not in raw:
        u8 = np.frombuffer(raw, dtype=np.uint8)
        hist = _byte_histogram(u8)
        if not hist[0x80:].any():
            return len(raw), hist
        n_cont = int(hist[0x80:0xC0].sum())
        found = _multibyte_chars(u8, n_cont)
        if found is not None and (not normalize_nfc or _all_inert(found[1])):
            counts = np.bincount(found[1], minlength=0x80)
            counts[:0x80] += hist[:0x80]
            return len(raw) - n_cont, counts
    cps = codepoints(decode_chunk(raw, path, offset, normalize_nfc))
    return len(cps), np.bincount(cps, minlength=0x80)


class ChunkEncoder:
    """Token ids of chunks, as ``tokenizer.lookup(codepoints(decode_chunk(...)))`` gives them."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.tokenizer = tokenizer
        self._byte_ids = tokenizer.table[:256]  # ids of ASCII bytes (the rest are overwritten)
        # For uint8 vocabularies bytes.translate maps bytes to ids and drops
        # continuation bytes in one pass, the fastest way numpy-side or not.
        self._translate = self._byte_ids.tobytes() if tokenizer.dtype == np.uint8 else None

    def ids(self, raw: bytes, path: Path, offset: int) -> np.ndarray:
        if b"\r" not in raw:
            u8 = np.frombuffer(raw, dtype=np.uint8)
            if self._translate is not None:
                ids = np.frombuffer(bytearray(raw).translate(self._translate, _CONTINUATION),
                                    dtype=np.uint8)
                if len(ids) == len(raw):  # ASCII only
                    return ids
            else:
                keep = (u8 & 0xC0) != 0x80  # every byte but continuation bytes starts a char
                ids = self._byte_ids[u8][keep]
            found = _multibyte_chars(u8, len(raw) - len(ids))
            if found is not None and (not self.tokenizer.normalize_nfc or _all_inert(found[1])):
                ids[found[0]] = self.tokenizer.lookup(found[1])
                return ids
        text = decode_chunk(raw, path, offset, self.tokenizer.normalize_nfc)
        return self.tokenizer.lookup(codepoints(text))
