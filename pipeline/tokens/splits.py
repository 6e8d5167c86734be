"""Reading what the encode stage wrote: ``tokenizer.json``, ``meta.json`` and the split files.

``data/encoded/`` holds ``{train,val,test}.bin`` (flat token ids, dtype in
``meta.json``), ``tokenizer.json`` (the tokenizer description, as stored in model
files) and ``meta.json``. These functions are its one reader, for training,
evaluation, export and the comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from chargen.errors import ChargenError
from chargen.tokenizers import Tokenizer, TokenizerError, from_description
from pipeline.files import read_json_object

SPLITS = ("train", "val", "test")
SPLIT_DTYPES = ("uint8", "uint16")
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
_FIX = "run `dvc repro encode`"


class SplitError(ChargenError):
    """The encoded data is missing, damaged or does not fit the request."""


def read_meta(encoded_dir: str | Path) -> dict[str, Any]:
    """``meta.json``, checked to name the split files' dtype."""
    path = Path(encoded_dir) / META_FILE
    meta = read_json_object(path, "encoding metadata", _FIX)
    if meta.get("dtype") not in SPLIT_DTYPES:
        raise SplitError(f"{path}: no valid 'dtype' (one of {', '.join(SPLIT_DTYPES)}); {_FIX}")
    return meta


def split_chars_per_token(encoded_dir: str | Path, meta: dict[str, Any], split: str) -> float:
    """Mean characters per token of a split, from ``meta.json``'s ``chars`` and ``splits``."""
    try:
        return meta["chars"][split] / meta["splits"][split]
    except (KeyError, TypeError, ZeroDivisionError):
        raise SplitError(f"{Path(encoded_dir) / META_FILE}: no character count of the {split} split; {_FIX}") from None


def read_tokenizer(encoded_dir: str | Path) -> Tokenizer:
    """The tokenizer the splits were encoded with."""
    path = Path(encoded_dir) / TOKENIZER_FILE
    try:
        return from_description(read_json_object(path, "tokenizer description", _FIX))
    except TokenizerError as e:
        raise SplitError(f"{path}: {e}; {_FIX}") from None


def split_path(encoded_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise SplitError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return Path(encoded_dir) / f"{split}.bin"


def read_split(encoded_dir: str | Path, split: str) -> np.ndarray:
    """A whole split (N,) as token ids, for measurements that visit every token once;
    a split whose length differs from ``meta.json``'s count is damaged."""
    path = split_path(encoded_dir, split)
    meta = read_meta(encoded_dir)
    try:
        ids = np.fromfile(path, dtype=np.dtype(meta["dtype"]))
    except (OSError, ValueError) as e:
        raise SplitError(f"{path}: cannot read the {split} split ({e}); {_FIX}") from None
    expected = meta.get("splits", {}).get(split) if isinstance(meta.get("splits"), dict) else None
    if isinstance(expected, int) and ids.size != expected:
        raise SplitError(f"{path}: {ids.size} tokens where {META_FILE} counts {expected}; {_FIX}")
    return ids


def read_scored_split(encoded_dir: str | Path, tokenizer: Tokenizer, split: str = "test") -> np.ndarray:
    """A split to score with a model of ``tokenizer``: encoded with that tokenizer, and
    long enough for one prediction."""
    if read_tokenizer(encoded_dir) != tokenizer:
        raise SplitError(f"{encoded_dir} was encoded with another tokenizer than the model's; "
                         "re-run the pipeline from the stage that changed (dvc repro)")
    ids = read_split(encoded_dir, split)
    if ids.size < 2:
        raise SplitError(f"{split_path(encoded_dir, split)}: fewer than 2 tokens, nothing to score; "
                         "give encode a larger share of the corpus for it (encode.*_frac)")
    return ids
