"""The encode stage: raw documents -> vocab.json, meta.json and memmap-able split files.

Two streaming passes over the corpus, so memory does not grow with its size:

1. count every character (after optional NFC normalisation) and each document's
   length, which fixes the vocabulary, the id dtype and each document's split points;
2. encode again, chunk by chunk, appending each document's train / val / test
   slice (its first, middle and last part) to the matching split file, each slice
   followed by the end-of-text token.

Both passes read documents through :func:`iter_chunks`, which is deterministic,
so the second pass sees exactly the characters the first one counted. Chunks
that are plain valid UTF-8 (the common case) are read with numpy straight from
the bytes; the rest are decoded and normalised through str; both give the same
characters.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.atomic import atomic_dir
from pipeline.errors import ChargenError
from pipeline.params import EncodeParams
from pipeline.vocab import MAX_CODEPOINT, Vocab, codepoints

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
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


@dataclass(frozen=True)
class Document:
    name: str
    path: Path
    sha256: str | None = None  # as listed in the manifest, checked while counting


@dataclass(frozen=True)
class DocumentStats:
    chars: int  # after newline and NFC normalisation
    nbytes: int  # raw UTF-8 bytes on disk
    sha256: str  # of the raw bytes


# --------------------------------------------------------------------------- manifest


def read_manifest(raw_dir: str | Path) -> list[Document]:
    """The documents listed in ``<raw_dir>/manifest.json``, in manifest order."""
    raw_dir = Path(raw_dir)
    hint = "run `dvc repro download` first"
    if not raw_dir.is_dir():
        raise EncodeError(f"{raw_dir}: raw corpus directory not found; {hint}")
    path = raw_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EncodeError(f"{path}: not found; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EncodeError(f"{path}: not valid JSON ({e}); {hint}") from None
    entries = manifest.get("documents") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise EncodeError(f"{path}: expected a 'documents' list; {hint}")
    if not entries:
        raise EncodeError(f"{path}: lists no documents (empty corpus); check download.sources")
    root = raw_dir.resolve()
    docs = []
    for i, entry in enumerate(entries):
        file = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(file, str) or not file:
            raise EncodeError(f"{path}: documents[{i}] has no 'file'; {hint}")
        doc_path = (raw_dir / file).resolve()
        if not doc_path.is_relative_to(root):
            raise EncodeError(f"{path}: documents[{i}].file {file!r} points outside {raw_dir}")
        if not doc_path.is_file():
            raise EncodeError(f"{raw_dir / file}: listed in the manifest but missing; {hint}")
        sha = entry.get("sha256")
        docs.append(
            Document(
                name=str(entry.get("name") or file),
                path=doc_path,
                sha256=sha.lower() if isinstance(sha, str) else None,
            )
        )
    return docs


# --------------------------------------------------------------------------- chunks


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
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text) if normalize_nfc else text


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
    """Token ids of chunks, as ``vocab.lookup(codepoints(decode_chunk(...)))`` gives them."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self._byte_ids = vocab.table[:256]  # ids of ASCII bytes (the rest are overwritten)
        # For uint8 vocabularies bytes.translate maps bytes to ids and drops
        # continuation bytes in one pass, the fastest way numpy-side or not.
        self._translate = self._byte_ids.tobytes() if vocab.dtype == np.uint8 else None

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
            if found is not None and (not self.vocab.normalize_nfc or _all_inert(found[1])):
                ids[found[0]] = self.vocab.lookup(found[1])
                return ids
        text = decode_chunk(raw, path, offset, self.vocab.normalize_nfc)
        return self.vocab.lookup(codepoints(text))


# --------------------------------------------------------------------------- splits


def split_sizes(n_chars: int, params: EncodeParams) -> tuple[int, int, int]:
    """Characters of a document going to (train, val, test); val and test are rounded."""
    n_val = int(n_chars * params.val_frac + 0.5)
    n_test = min(int(n_chars * params.test_frac + 0.5), n_chars - n_val)
    return n_chars - n_val - n_test, n_val, n_test


# --------------------------------------------------------------------------- the stage


def count_corpus(
    docs: list[Document], params: EncodeParams
) -> tuple[list[DocumentStats], np.ndarray]:
    """Pass 1: per-document stats and per-code-point character counts."""
    counts = np.zeros(256, dtype=np.int64)
    stats = []
    for doc in docs:
        h = hashlib.sha256()
        n_chars = 0
        chunks = iter_chunks(doc.path, params.chunk_chars, params.normalize_nfc, h.update)
        for offset, raw in chunks:
            n, chunk_counts = count_chunk(raw, doc.path, offset, params.normalize_nfc)
            n_chars += n
            if len(chunk_counts) > len(counts):
                chunk_counts[: len(counts)] += counts
                counts = chunk_counts
            else:
                counts[: len(chunk_counts)] += chunk_counts
        digest = h.hexdigest()
        if doc.sha256 is not None and digest != doc.sha256:
            raise EncodeError(
                f"{doc.path}: contents do not match the sha256 in {MANIFEST} (edited or damaged "
                "after download); run `dvc repro download` again"
            )
        stats.append(DocumentStats(chars=n_chars, nbytes=doc.path.stat().st_size, sha256=digest))
    return stats, counts


def encode_corpus(raw_dir: str | Path, params: EncodeParams) -> dict[str, Any]:
    """Encode ``raw_dir`` into ``params.out_dir`` (swapped in atomically); return meta.json."""
    docs = read_manifest(raw_dir)
    stats, char_counts = count_corpus(docs, params)
    total_chars = sum(s.chars for s in stats)
    if total_chars == 0:
        raise EncodeError(f"{raw_dir}: all {len(docs)} documents are empty; check download.sources")

    plan = [split_sizes(s.chars, params) for s in stats]
    eot_count = sum(1 for sizes in plan for n in sizes if n)
    vocab = Vocab.from_char_counts(
        char_counts,
        eot_count=eot_count,
        min_char_count=params.min_char_count,
        normalize_nfc=params.normalize_nfc,
    )
    expected = {
        split: sum(sizes[k] + (1 if sizes[k] else 0) for sizes in plan)
        for k, split in enumerate(SPLITS)
    }
    corpus_sha256 = hashlib.sha256(
        "".join(f"{s.sha256}  {d.name}\n" for d, s in zip(docs, stats, strict=True)).encode()
    ).hexdigest()
    meta = {
        "dtype": vocab.dtype.name,
        "vocab_size": vocab.size,
        "splits": expected,
        "documents": len(docs),
        "corpus_sha256": corpus_sha256,
    }

    with atomic_dir(params.out_dir) as tmp:
        with contextlib.ExitStack() as stack:
            outs = [stack.enter_context(open(tmp / f"{split}.bin", "wb")) for split in SPLITS]
            encoder = ChunkEncoder(vocab)
            for doc, sizes in zip(docs, plan, strict=True):
                _encode_document(doc, sizes, encoder, params, outs)
        for split in SPLITS:
            written = (tmp / f"{split}.bin").stat().st_size // vocab.dtype.itemsize
            if written != expected[split]:
                raise EncodeError(
                    f"{raw_dir}: documents changed while encoding ({split}: {written} tokens, "
                    f"expected {expected[split]}); run the stage again"
                )
        _write_json(tmp / "vocab.json", vocab.to_dict())
        _write_json(tmp / "meta.json", meta)
    return meta


def _encode_document(
    doc: Document,
    sizes: tuple[int, int, int],
    encoder: ChunkEncoder,
    params: EncodeParams,
    outs: list[BinaryIO],
) -> None:
    """Pass 2 for one document: its chunks' ids, routed to the split they fall in."""
    bounds = np.cumsum((0,) + sizes)  # split k covers document chars [bounds[k], bounds[k+1])
    eot = np.array([encoder.vocab.eot_id], dtype=encoder.vocab.dtype)
    pos = 0
    for offset, raw in iter_chunks(doc.path, params.chunk_chars, params.normalize_nfc):
        ids = encoder.ids(raw, doc.path, offset)
        end = pos + len(ids)
        for k, out in enumerate(outs):
            lo, hi = max(bounds[k], pos), min(bounds[k + 1], end)
            if lo < hi:
                out.write(ids[lo - pos : hi - pos])
        pos = end
    for k, out in enumerate(outs):
        if sizes[k]:
            out.write(eot)


def _write_json(path: Path, obj: Any) -> None:
    # Inside the temp directory of atomic_dir, so a plain write is already atomic.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
