"""Reading the small JSON files one stage hands to the next, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ChargenError


def read_object(path: str | Path, error: type[ChargenError], what: str, fix: str) -> dict:
    """The JSON object in ``path``; ``error`` names the problem and ends with ``fix``
    when the file is missing, unreadable or holds something other than an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: not found; {fix}") from None
    except (OSError, ValueError) as e:
        raise error(f"{path}: unreadable {what} ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object of {what}; {fix}")
    return obj
