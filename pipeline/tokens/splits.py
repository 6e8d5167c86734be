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
    """A whole split (N,) as token ids, for measurements that visit every token once."""
    path = split_path(encoded_dir, split)
    dtype = np.dtype(read_meta(encoded_dir)["dtype"])
    try:
        return np.fromfile(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SplitError(f"{path}: cannot read the {split} split ({e}); {_FIX}") from None
