"""Safe reading of archive members: traversal, links and bombs are refused."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.corpus.archive import (
    ArchiveError,
    archive_kind,
    glob_regex,
    literal_prefix,
    read_members,
)


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                name, data = m
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def collect(path: Path, pattern: str, max_bytes: int = 1 << 20) -> dict[str, bytes]:
    got: dict[str, bytes] = {}

    def sink(name, chunks):
        got[name] = b"".join(chunks)

    read_members(path, pattern, max_bytes, sink)
    return got


def test_reads_matching_members_of_tar_zip_and_wheel(tmp_path):
    files = [("pkg-1.0/texts/a.txt", b"alpha"), ("pkg-1.0/texts/b.txt", b"beta"),
             ("pkg-1.0/setup.py", b"raise SystemExit('never run')"), ("pkg-1.0/texts/sub/c.txt", b"c")]
    tgz = make_tar(tmp_path / "pkg-1.0.tar.gz", files)
    assert collect(tgz, "pkg-1.0/texts/*.txt") == {"pkg-1.0/texts/a.txt": b"alpha",
                                                    "pkg-1.0/texts/b.txt": b"beta"}
    for name in ("pkg-1.0.zip", "pkg-1.0-py3-none-any.whl"):
        with zipfile.ZipFile(tmp_path / name, "w", zipfile.ZIP_DEFLATED) as zf:
            for n, d in files:
                zf.writestr(n, d)
        assert collect(tmp_path / name, "**/*.txt") == {n: d for n, d in files if n.endswith(".txt")}


def test_glob_segments_and_prefix():
    rx = glob_regex("a/*.txt")
    assert rx.match("a/x.txt") and not rx.match("a/b/x.txt")
    rx = glob_regex("a/**/*.txt")
    assert rx.match("a/x.txt") and rx.match("a/b/c/x.txt") and not rx.match("b/x.txt")
    assert glob_regex("t/[!x]?.txt").match("t/ab.txt") and not glob_regex("t/[!x]?.txt").match("t/xb.txt")
    assert literal_prefix("pkg-1.0/texts/*_gut.txt") == "pkg-1.0/texts/"
    assert literal_prefix("**/*.txt") == ""
    assert archive_kind("X.TAR.GZ") == "tar" and archive_kind("a.whl") == "zip"
    assert archive_kind("a.txt") is None


@pytest.mark.parametrize("bad", ["../evil.txt", "pkg/../../evil.txt", "/tmp/evil.txt"])
def test_tar_path_traversal_is_refused(tmp_path, bad):
    tgz = make_tar(tmp_path / "x.tar.gz", [("pkg/ok.txt", b"ok"), (bad, b"pwned")])
    with pytest.raises(ArchiveError, match="outside the archive"):
        collect(tgz, "**/*.txt")
    assert not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_are_refused(tmp_path, kind):
    tgz = make_tar(tmp_path / "x.tar.gz", [("pkg/ok.txt", b"ok"), link("pkg/passwd.txt", "/etc/passwd", kind)])
    with pytest.raises(ArchiveError, match="is a link"):
        collect(tgz, "pkg/*.txt")


def test_zip_traversal_and_symlink_are_refused(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        zf.writestr("../../evil.txt", b"pwned")
    with pytest.raises(ArchiveError, match="path traversal"):
        collect(bad, "*.txt")

    sym = tmp_path / "sym.zip"
    with zipfile.ZipFile(sym, "w") as zf:
        info = zipfile.ZipInfo("passwd.txt")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="is a link"):
        collect(sym, "*.txt")


def test_archive_bombs_are_refused(tmp_path):
    zeros = b"\0" * (3 << 20)
    tgz = make_tar(tmp_path / "bomb.tar.gz", [("a.txt", zeros)])
    assert tgz.stat().st_size < 50_000
    with pytest.raises(ArchiveError, match="max_extract_mb"):
        collect(tgz, "*.txt", max_bytes=1 << 20)
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.txt", zeros)
    with pytest.raises(ArchiveError, match="max_extract_mb"):
        collect(z, "*.txt", max_bytes=1 << 20)


def test_glob_matching_nothing_lists_examples(tmp_path):
    tgz = make_tar(tmp_path / "x.tar.gz", [("pkg/data/a.txt", b"a")])
    with pytest.raises(ArchiveError, match=r"'pkg/texts/\*.txt' matches nothing.*pkg/data/a.txt"):
        collect(tgz, "pkg/texts/*.txt")


def test_corrupt_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(ArchiveError, match="not a valid archive"):
        collect(bad, "*.txt")
    bad_zip = tmp_path / "x.zip"
    bad_zip.write_bytes(b"PK nonsense")
    with pytest.raises(ArchiveError, match="not a valid archive"):
        collect(bad_zip, "*.txt")
