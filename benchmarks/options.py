"""Option types and path checks the benchmark scripts share.

A bad count is argparse's usage error (exit 2), named by its option. A path that
is not there is a ChargenError, which ``pipeline.stage.run_stage`` prints as one
line (exit 1), as the stages do.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from chargen.errors import ChargenError
from pipeline import files

MODEL_FILE = "an exported model file (`dvc repro` writes models/model.int8.onnx)"  # for require_file


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def require_file(path: str | Path, option: str, wanted: str) -> Path:
    """``path`` when it is a file; else a ChargenError saying to pass ``wanted`` as ``option``."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise ChargenError(f"{option}: {path} {what}; pass {wanted}")
    return path


def require_dir(path: str | Path, option: str) -> Path:
    """``path`` when it is a folder; else a ChargenError naming ``option``."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ChargenError(f"{option}: {path} {what}; pass an existing folder")
    return path


def make_dir(path: str | Path, option: str) -> Path:
    """``path``, created with its parents when missing; a ChargenError naming ``option`` if it cannot be."""
    return files.make_dir(path, f"pass a folder you can write as {option}")
