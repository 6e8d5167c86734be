"""The encode stage: raw documents -> tokenizer.json, meta.json and memmap-able split files.

Streaming passes over the corpus, so memory does not grow with its size:

1. count every character (after the tokenizer's normalisation) and each document's
   length, which fixes each document's split points (and the character tokenizer's
   vocabulary);
2. for ``bpe`` only, learn the merges from the train slices (``bpe_train``);
3. encode again, chunk by chunk, appending each document's train / val / test
   slice (its first, middle and last part) to the matching split file, each slice
   followed by the end-of-text token.

A document whose manifest entry names a ``split`` goes to that split whole instead. With
``line_records`` each of its lines is a record of its own: the end-of-text token takes
the place of every line break, so a model learns to end a record where the line ends
(each record is encoded on its own, as a prompt of that record is at inference).

Every pass reads documents through :func:`pipeline.tokens.utf8.iter_chunks`, which is
deterministic, so later passes see exactly the characters the first one counted. The
character tokenizer encodes the raw chunks with numpy fast paths; the byte and BPE
tokenizers encode each slice's text with the runtime tokenizer itself, so training data
and prompts are encoded by the same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from chargen.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer
from chargen.tokenizers.base import UINT16_MAX_TOKENS
from pipeline.corpus.manifest import Document, read_manifest
from pipeline.files import atomic_dir, write_json
from pipeline.params import EncodeParams
from pipeline.tokens import bpe_train
from pipeline.tokens.splits import META_FILE, SPLITS, TOKENIZER_FILE
from pipeline.tokens.utf8 import ChunkEncoder, EncodeError, count_chunk, iter_chunks, iter_text

TRAIN = SPLITS.index("train")
Piece = TypeVar("Piece", str, np.ndarray)


@dataclass(frozen=True)
class DocumentStats:
    chars: int  # after newline and NFC normalisation
    nbytes: int  # raw UTF-8 bytes on disk
    sha256: str  # of the raw bytes


# --------------------------------------------------------------------------- splits


def split_sizes(n_chars: int, params: EncodeParams) -> tuple[int, int, int]:
    """Characters of a document going to (train, val, test); val and test are rounded."""
    n_val = int(n_chars * params.val_frac + 0.5)
    n_test = min(int(n_chars * params.test_frac + 0.5), n_chars - n_val)
    return n_chars - n_val - n_test, n_val, n_test


def document_sizes(doc: Document, n_chars: int, params: EncodeParams) -> tuple[int, int, int]:
    """(train, val, test) characters of a document: all in its own split when it names one."""
    if doc.split is None:
        return split_sizes(n_chars, params)
    return tuple(n_chars if split == doc.split else 0 for split in SPLITS)


def split_chars(doc: Document, sizes: tuple[int, int, int]) -> tuple[int, int, int]:
    """Characters a document adds to each split as every per-character loss counts them:
    its own, and an end-of-text token (one character) after each non-empty slice unless
    its records already end with one."""
    return tuple(n + (1 if n and not doc.line_records else 0) for n in sizes)


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
        last_raw = b""
        for offset, raw in chunks:
            last_raw = raw
            n, chunk_counts = count_chunk(raw, doc.path, offset, params.normalize_nfc)
            n_chars += n
            if len(chunk_counts) > len(counts):
                chunk_counts[: len(counts)] += counts
                counts = chunk_counts
            else:
                counts[: len(chunk_counts)] += chunk_counts
        digest = h.hexdigest()
        if doc.line_records and n_chars and not last_raw.endswith((b"\n", b"\r")):
            raise EncodeError(
                f"{doc.path}: its lines are records, but the last one has no line break; "
                "run `dvc repro download` again"
            )
        if doc.sha256 is not None and digest != doc.sha256:
            raise EncodeError(
                f"{doc.path}: contents do not match the sha256 in the manifest (edited or damaged "
                "after download); run `dvc repro download` again"
            )
        stats.append(DocumentStats(chars=n_chars, nbytes=doc.path.stat().st_size, sha256=digest))
    return stats, counts


def encode_corpus(raw_dir: str | Path, params: EncodeParams,
                  vocabulary: Callable[[np.ndarray], CharTokenizer] | None = None) -> dict[str, Any]:
    """Encode ``raw_dir`` into ``params.out_dir`` (swapped in atomically); return meta.json.

    ``vocabulary`` maps the corpus's per-code-point character counts to the tokenizer to
    use (fine-tuning keeps the base model's); by default it is built from the counts.
    """
    docs = read_manifest(raw_dir)
    stats, char_counts = count_corpus(docs, params)
    total_chars = sum(s.chars for s in stats)
    if total_chars == 0:
        raise EncodeError(f"{raw_dir}: all {len(docs)} documents are empty; check download.sources")
    plan = [document_sizes(d, s.chars, params) for d, s in zip(docs, stats, strict=True)]
    tokenizer = make_tokenizer(docs, plan, char_counts, params) if vocabulary is None else vocabulary(char_counts)
    added = [split_chars(d, sizes) for d, sizes in zip(docs, plan, strict=True)]
    expected = {split: sum(chars[k] for chars in added) for k, split in enumerate(SPLITS)}
    corpus_sha256 = hashlib.sha256(
        "".join(f"{s.sha256}  {d.name}\n" for d, s in zip(docs, stats, strict=True)).encode()
    ).hexdigest()

    with atomic_dir(params.out_dir) as tmp:
        with contextlib.ExitStack() as stack:
            outs = [stack.enter_context(open(tmp / f"{split}.bin", "wb")) for split in SPLITS]
            eot = np.array([tokenizer.eot_id], dtype=tokenizer.dtype)
            for doc, sizes in zip(docs, plan, strict=True):
                for k, ids in document_ids(doc, sizes, tokenizer, params):
                    outs[k].write(ids)
                for k, out in enumerate(outs):
                    if sizes[k] and not doc.line_records:
                        out.write(eot)
        counts = np.zeros(tokenizer.size, dtype=np.int64)
        tokens, chars = {}, {}
        for split in SPLITS:
            split_counts = np.bincount(np.fromfile(tmp / f"{split}.bin", dtype=tokenizer.dtype),
                                       minlength=tokenizer.size)
            tokens[split] = int(split_counts.sum())
            chars[split] = int(split_counts @ tokenizer.chars_per_token())
            if chars[split] != expected[split]:
                raise EncodeError(
                    f"{raw_dir}: documents changed while encoding ({split}: {chars[split]} characters, "
                    f"expected {expected[split]}); run the stage again"
                )
            counts += split_counts
        meta = {
            "dtype": tokenizer.dtype.name,
            "vocab_size": tokenizer.size,
            "splits": tokens,  # tokens per split file
            "chars": chars,  # characters per split, each end-of-text counting as one
            "documents": len(docs),
            "corpus_sha256": corpus_sha256,
            "token_counts": counts.tolist(),  # occurrences of each token id over the splits
        }
        write_json(tmp / TOKENIZER_FILE, tokenizer.describe())
        write_json(tmp / META_FILE, meta)
    return meta


# --------------------------------------------------------------------------- tokenizers


def make_tokenizer(
    docs: list[Document], plan: list[tuple[int, int, int]], char_counts: np.ndarray, params: EncodeParams
) -> Tokenizer:
    """The ``params.tokenizer`` kind of tokenizer for this corpus."""
    if params.tokenizer == "char":
        warn_if_mostly_unknown(char_counts, params.min_char_count)
        return CharTokenizer.from_char_counts(
            char_counts, min_char_count=params.min_char_count, normalize_nfc=params.normalize_nfc
        )
    if params.tokenizer == "byte":
        return ByteTokenizer(normalize_nfc=params.normalize_nfc)
    return learn_bpe(docs, plan, params)


def learn_bpe(docs: list[Document], plan: list[tuple[int, int, int]], params: EncodeParams) -> BPETokenizer:
    """BPE merges learned from the train slices only, so validation and test text stays unseen."""
    if not bpe_train.MIN_VOCAB_SIZE <= params.vocab_size <= UINT16_MAX_TOKENS:
        raise EncodeError(
            f"encode.vocab_size: a bpe vocabulary needs {bpe_train.MIN_VOCAB_SIZE} to "
            f"{UINT16_MAX_TOKENS} tokens (256 bytes, end-of-text, merges), got {params.vocab_size}"
        )
    texts = (
        text
        for doc, sizes in zip(docs, plan, strict=True)
        for k, text in bpe_train.safe_chunks(slice_texts(doc, sizes, params))
        if k == TRAIN
    )
    tokenizer = bpe_train.train(texts, params.vocab_size, normalize_nfc=params.normalize_nfc)
    if tokenizer.size < params.vocab_size:
        print(
            f"warning: encode.vocab_size={params.vocab_size} but the train split repeats pairs "
            f"for only {tokenizer.size} tokens; the vocabulary has {tokenizer.size}",
            file=sys.stderr,
        )
    return tokenizer


# A corpus where this share of the characters maps to the unknown token is mostly lost.
UNKNOWN_WARN_SHARE = 0.01


def warn_if_mostly_unknown(char_counts: np.ndarray, min_char_count: int) -> None:
    """Warn when ``min_char_count`` sends a noticeable share of the text to the unknown token."""
    rare = (char_counts > 0) & (char_counts < min_char_count)
    share = char_counts[rare].sum() / max(1, char_counts.sum())
    if share > UNKNOWN_WARN_SHARE:
        print(
            f"warning: encode.min_char_count={min_char_count} maps {share:.1%} of the characters "
            f"({int(rare.sum())} distinct) to the unknown token, leaving "
            f"{int((char_counts >= min_char_count).sum())} characters; lower encode.min_char_count",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- pass 2


def document_ids(
    doc: Document, sizes: tuple[int, int, int], tokenizer: Tokenizer, params: EncodeParams
) -> Iterator[tuple[int, np.ndarray]]:
    """``(split index, ids)`` pieces of one document, in order (storage dtype)."""
    if isinstance(tokenizer, CharTokenizer):
        ids = _char_ids(doc, sizes, ChunkEncoder(tokenizer), params)
        yield from _char_records(doc, ids, tokenizer) if doc.line_records else ids
        return
    pieces = slice_texts(doc, sizes, params)
    if doc.line_records:
        yield from _records(pieces, tokenizer)
        return
    if isinstance(tokenizer, BPETokenizer):  # merges must not see a cut the whole text lacks
        pieces = bpe_train.safe_chunks(pieces)
    for k, text in pieces:
        yield k, tokenizer.encode(text).astype(tokenizer.dtype)


def _char_ids(
    doc: Document, sizes: tuple[int, int, int], encoder: ChunkEncoder, params: EncodeParams
) -> Iterator[tuple[int, np.ndarray]]:
    """One id per character, straight from the raw chunks."""
    chunks = iter_chunks(doc.path, params.chunk_chars, params.normalize_nfc)
    return _route((encoder.ids(raw, doc.path, offset) for offset, raw in chunks), sizes)


def _char_records(
    doc: Document, pieces: Iterable[tuple[int, np.ndarray]], tokenizer: CharTokenizer
) -> Iterator[tuple[int, np.ndarray]]:
    """Character ids of a document of records: each line break becomes end-of-text."""
    newline = int(tokenizer.encode("\n")[0])
    if newline == tokenizer.unk_id:
        raise EncodeError(f"{doc.path}: its records end with line breaks, which encode.min_char_count "
                          "leaves out of the vocabulary; lower encode.min_char_count")
    for k, ids in pieces:
        yield k, np.where(ids == newline, tokenizer.eot_id, ids).astype(ids.dtype)


def _records(pieces: Iterable[tuple[int, str]], tokenizer: Tokenizer) -> Iterator[tuple[int, np.ndarray]]:
    """Ids of a document of records, each line encoded alone and ended by end-of-text
    (its line break checked to be there by the first pass)."""
    carry, eot = "", np.array([tokenizer.eot_id], dtype=tokenizer.dtype)
    for k, text in pieces:  # one split: a document of records goes to its split whole
        *lines, carry = (carry + text).split("\n")
        ids = [tokenizer.encode(line).astype(tokenizer.dtype) for line in lines]
        if ids:
            yield k, np.concatenate([x for line_ids in ids for x in (line_ids, eot)])


def slice_texts(doc: Document, sizes: tuple[int, int, int], params: EncodeParams) -> Iterator[tuple[int, str]]:
    """``(split index, text)`` pieces of one document's normalised text, in order."""
    return _route(iter_text(doc.path, params.chunk_chars, params.normalize_nfc), sizes)


def _route(pieces: Iterable[Piece], sizes: tuple[int, int, int]) -> Iterator[tuple[int, Piece]]:
    """A document's pieces (texts, or ids one per character), cut where its splits meet."""
    bounds = np.cumsum((0,) + sizes)  # split k covers document chars [bounds[k], bounds[k+1])
    pos = 0
    for piece in pieces:
        end = pos + len(piece)
        for k in range(len(SPLITS)):
            lo, hi = max(bounds[k], pos), min(bounds[k + 1], end)
            if lo < hi:
                yield k, piece[lo - pos : hi - pos]
        pos = end
