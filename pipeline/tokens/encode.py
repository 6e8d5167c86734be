"""The encode stage: raw documents -> tokenizer.json, meta.json and memmap-able split files.

Two streaming passes over the corpus, so memory does not grow with its size:

1. count every character (after the tokenizer's normalisation) and each document's
   length, which fixes the vocabulary, the id dtype and each document's split points;
2. encode again, chunk by chunk, appending each document's train / val / test
   slice (its first, middle and last part) to the matching split file, each slice
   followed by the end-of-text token.

Both passes read documents through :func:`pipeline.tokens.utf8.iter_chunks`, which is
deterministic, so the second pass sees exactly the characters the first one counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from chargen.tokenizers import CharTokenizer
from pipeline.corpus.manifest import Document, read_manifest
from pipeline.files import atomic_dir, write_json
from pipeline.params import EncodeParams
from pipeline.tokens.splits import META_FILE, SPLITS, TOKENIZER_FILE
from pipeline.tokens.utf8 import ChunkEncoder, EncodeError, count_chunk, iter_chunks


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
    if vocabulary is None:
        tokenizer = CharTokenizer.from_char_counts(
            char_counts, min_char_count=params.min_char_count, normalize_nfc=params.normalize_nfc
        )
        warn_if_mostly_unknown(char_counts, params.min_char_count)
    else:
        tokenizer = vocabulary(char_counts)

    plan = [split_sizes(s.chars, params) for s in stats]
    expected = {
        split: sum(sizes[k] + (1 if sizes[k] else 0) for sizes in plan)
        for k, split in enumerate(SPLITS)
    }
    corpus_sha256 = hashlib.sha256(
        "".join(f"{s.sha256}  {d.name}\n" for d, s in zip(docs, stats, strict=True)).encode()
    ).hexdigest()

    with atomic_dir(params.out_dir) as tmp:
        with contextlib.ExitStack() as stack:
            outs = [stack.enter_context(open(tmp / f"{split}.bin", "wb")) for split in SPLITS]
            encoder = ChunkEncoder(tokenizer)
            for doc, sizes in zip(docs, plan, strict=True):
                _encode_document(doc, sizes, encoder, params, outs)
        counts = np.zeros(tokenizer.size, dtype=np.int64)
        for split in SPLITS:
            ids = np.fromfile(tmp / f"{split}.bin", dtype=tokenizer.dtype)
            if len(ids) != expected[split]:
                raise EncodeError(
                    f"{raw_dir}: documents changed while encoding ({split}: {len(ids)} tokens, "
                    f"expected {expected[split]}); run the stage again"
                )
            counts += np.bincount(ids, minlength=tokenizer.size)
        meta = {
            "dtype": tokenizer.dtype.name,
            "vocab_size": tokenizer.size,
            "splits": expected,
            "documents": len(docs),
            "corpus_sha256": corpus_sha256,
            "token_counts": counts.tolist(),  # occurrences of each token id over the splits
        }
        write_json(tmp / TOKENIZER_FILE, tokenizer.describe())
        write_json(tmp / META_FILE, meta)
    return meta


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


def _encode_document(
    doc: Document,
    sizes: tuple[int, int, int],
    encoder: ChunkEncoder,
    params: EncodeParams,
    outs: list[BinaryIO],
) -> None:
    """Pass 2 for one document: its chunks' ids, routed to the split they fall in."""
    bounds = np.cumsum((0,) + sizes)  # split k covers document chars [bounds[k], bounds[k+1])
    eot = np.array([encoder.tokenizer.eot_id], dtype=encoder.tokenizer.dtype)
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
