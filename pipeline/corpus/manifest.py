"""``data/raw/manifest.json``: the documents the download stage wrote, as the encode stage reads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chargen.errors import ChargenError
from pipeline.files import read_json_object
from pipeline.tokens.splits import SPLITS

MANIFEST = "manifest.json"


class ManifestError(ChargenError):
    """The raw corpus directory or its manifest is missing or malformed."""


@dataclass(frozen=True)
class Document:
    name: str
    path: Path
    sha256: str | None = None  # as listed in the manifest, checked while counting
    split: str | None = None  # the split the whole document goes to; None: cut by position
    line_records: bool = False  # each line is a record, ended by end-of-text (only with a split)


def read_manifest(raw_dir: str | Path) -> list[Document]:
    """The documents listed in ``<raw_dir>/manifest.json``, in manifest order."""
    raw_dir = Path(raw_dir)
    hint = "run `dvc repro download` first"
    if not raw_dir.is_dir():
        raise ManifestError(f"{raw_dir}: raw corpus directory not found; {hint}")
    path = raw_dir / MANIFEST
    manifest = read_json_object(path, "corpus manifest", hint)
    entries = manifest.get("documents")
    if not isinstance(entries, list):
        raise ManifestError(f"{path}: expected a 'documents' list; {hint}")
    if not entries:
        raise ManifestError(f"{path}: lists no documents (empty corpus); check download.sources")
    root = raw_dir.resolve()
    docs = []
    for i, entry in enumerate(entries):
        file = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(file, str) or not file:
            raise ManifestError(f"{path}: documents[{i}] has no 'file'; {hint}")
        doc_path = (raw_dir / file).resolve()
        if not doc_path.is_relative_to(root):
            raise ManifestError(f"{path}: documents[{i}].file {file!r} points outside {raw_dir}")
        if not doc_path.is_file():
            raise ManifestError(f"{raw_dir / file}: listed in the manifest but missing; {hint}")
        sha = entry.get("sha256")
        split, line_records = entry.get("split"), entry.get("line_records", False)
        if split is not None and split not in SPLITS:
            raise ManifestError(f"{path}: documents[{i}].split must be one of {', '.join(SPLITS)}; {hint}")
        if not isinstance(line_records, bool) or (line_records and split is None):
            raise ManifestError(f"{path}: documents[{i}].line_records must be a boolean, true only "
                                f"with a split; {hint}")
        docs.append(
            Document(
                name=str(entry.get("name") or file),
                path=doc_path,
                sha256=sha.lower() if isinstance(sha, str) else None,
                split=split,
                line_records=line_records,
            )
        )
    return docs
