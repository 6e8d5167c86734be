"""`dvc repro encode` in a throwaway copy of the project, on a small local corpus.

Real git, real DVC, the real download and encode stages: the local corpus goes in
through a `path:` source, so nothing touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvcproject import dvc, make_dvc_project

DOCS = {
    "first.txt": "Now is the winter of our discontent\nMade glorious summer.\n" * 40,
    "second.txt": "To be, or not to be: that is the question.\n" * 40,
    "third.txt": "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n" * 40,
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_dvc_project(tmp_path / "project", DOCS)


def test_dvc_repro_encode_then_nothing_to_do(repo: Path):
    out = dvc(repo, "repro", "encode")
    assert "Running stage 'download'" in out and "Running stage 'encode'" in out

    encoded = repo / "data" / "encoded"
    meta = json.loads((encoded / "meta.json").read_text(encoding="utf-8"))
    assert meta["documents"] == len(DOCS)
    assert meta["dtype"] == "uint8"
    for split, n in meta["splits"].items():
        assert (encoded / f"{split}.bin").stat().st_size == n > 0
    tokenizer = json.loads((encoded / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer["kind"] == "char" and "\u00e9" in tokenizer["tokens"] and tokenizer["eot_id"] == 0
    assert (repo / "dvc.lock").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in encoded.iterdir()}

    again = dvc(repo, "repro", "encode")
    assert "Running stage" not in again
    assert "didn't change" in again
    assert {p.name: p.stat().st_mtime_ns for p in encoded.iterdir()} == stamps
    assert "up to date" in dvc(repo, "status", "encode")

    # Changing an encode param reruns encode only, not download.
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["encode"]["min_char_count"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    third = dvc(repo, "repro", "encode")
    assert "Running stage 'encode'" in third and "Running stage 'download'" not in third
    tokenizer = json.loads((encoded / "tokenizer.json").read_text(encoding="utf-8"))
    meta = json.loads((encoded / "meta.json").read_text(encoding="utf-8"))
    assert "\u00e9" not in tokenizer["tokens"] and meta["token_counts"][tokenizer["unk_id"]] > 0
