"""Reading text members out of archives, treating every archive as untrusted data.

Nothing is extracted with the archive's own paths and nothing in it is run:
members whose names match a glob are streamed to a callback.  An archive is
refused when any member name escapes its root (absolute or ``..``), when a
matched member is a link or a device, or when it decompresses to more than
the size cap (an archive bomb).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from chargen.errors import ChargenError

CHUNK = 1 << 16
_KINDS = {".tar.gz": "tar", ".tgz": "tar", ".tar.bz2": "tar", ".tar.xz": "tar", ".tar": "tar",
          ".zip": "zip", ".whl": "zip"}

# Called with the member's path inside the archive and an iterator over its bytes.
MemberSink = Callable[[str, Iterator[bytes]], None]


class ArchiveError(ChargenError):
    """The archive is unsafe, corrupt, too large, or has no member the glob asks for."""


def archive_kind(filename: str) -> str | None:
    """``"tar"`` or ``"zip"`` for a file name with an archive suffix, else None."""
    lower = filename.lower()
    for suffix, kind in _KINDS.items():
        if lower.endswith(suffix):
            return kind
    return None


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a member glob: ``*`` and ``?`` stay within one path segment, ``**/`` spans any."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def literal_prefix(pattern: str) -> str:
    """The leading directories of a glob that contain no wildcard (stripped from output names)."""
    parts = pattern.split("/")[:-1]
    keep = []
    for p in parts:
        if any(ch in p for ch in "*?["):
            break
        keep.append(p)
    return "/".join(keep) + "/" if keep else ""


def read_members(archive: Path, pattern: str, max_bytes: int, sink: MemberSink,
                 label: str | None = None) -> int:
    """Stream every member matching ``pattern`` to ``sink``; return how many matched."""
    label = label or archive.name
    kind = archive_kind(archive.name)
    regex = glob_regex(pattern)
    examples: list[str] = []
    try:
        if kind == "zip":
            count = _read_zip(archive, regex, max_bytes, sink, label, examples)
        elif kind == "tar":
            count = _read_tar(archive, regex, max_bytes, sink, label, examples)
        else:
            raise ArchiveError(f"{label}: not an archive this stage can read (.tar.gz, .tar, .zip, .whl)")
    except ArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
            OSError, NotImplementedError, RuntimeError) as e:
        raise ArchiveError(f"{label}: not a valid archive ({e}); delete it or fix the source") from None
    if count == 0:
        hint = f" (its files include {', '.join(examples)})" if examples else " (it holds no files)"
        raise ArchiveError(
            f"{label}: the members glob {pattern!r} matches nothing{hint}; fix 'members'"
        )
    return count


# --------------------------------------------------------------------------- checks


def _safe_name(name: str, label: str) -> str:
    """The member's path, normalised; refuse anything that could land outside the root."""
    clean = name.replace("\\", "/")
    while clean.startswith("./"):
        clean = clean[2:]
    parts = clean.rstrip("/").split("/")
    if (clean.startswith("/") or re.match(r"[A-Za-z]:", clean) or ".." in parts
            or "\x00" in clean):
        raise ArchiveError(
            f"{label}: refused, member {name!r} points outside the archive (path traversal); "
            "use a trustworthy source"
        )
    return "/".join(p for p in parts if p not in ("", "."))


class _Budget:
    """Counts bytes actually decompressed, whatever the headers claim."""

    def __init__(self, max_bytes: int, label: str) -> None:
        self.left = max_bytes
        self.max_bytes = max_bytes
        self.label = label

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ArchiveError(
                f"{self.label}: refused, it expands beyond download.max_extract_mb "
                f"({self.max_bytes // (1 << 20)} MB); raise the cap if the archive is trusted"
            )


class _CountingReader:
    """A file object for tarfile's stream mode that charges every byte to a budget."""

    def __init__(self, raw: IO[bytes], budget: _Budget) -> None:
        self.raw, self.budget = raw, budget

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.budget.spend(len(data))
        return data


def _chunks(f: IO[bytes], budget: _Budget | None) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        if budget is not None:
            budget.spend(len(chunk))
        yield chunk


# --------------------------------------------------------------------------- formats


def _open_decompressed(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _read_tar(path: Path, regex: re.Pattern[str], max_bytes: int, sink: MemberSink,
              label: str, examples: list[str]) -> int:
    budget = _Budget(max_bytes, label)
    seen: set[str] = set()
    with _open_decompressed(path) as raw, tarfile.open(
        fileobj=_CountingReader(raw, budget), mode="r|"  # type: ignore[arg-type]
    ) as tar:
        for info in tar:
            name = _safe_name(info.name, label)
            if info.isfile() and len(examples) < 3:
                examples.append(name)
            if not name or info.isdir() or not regex.match(name):
                continue
            if info.issym() or info.islnk():
                raise ArchiveError(f"{label}: refused, member {name!r} is a link; archives must hold plain files")
            if not info.isfile():
                raise ArchiveError(f"{label}: refused, member {name!r} is not a regular file")
            if name in seen:
                raise ArchiveError(f"{label}: refused, member {name!r} appears twice")
            seen.add(name)
            f = tar.extractfile(info)
            assert f is not None  # regular files always have a data stream
            sink(name, _chunks(f, None))  # the stream itself is already charged to the budget
    return len(seen)


def _read_zip(path: Path, regex: re.Pattern[str], max_bytes: int, sink: MemberSink,
              label: str, examples: list[str]) -> int:
    budget = _Budget(max_bytes, label)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [_safe_name(i.filename, label) for i in infos]  # check every name first
        chosen = []
        seen: set[str] = set()
        for info, name in zip(infos, names, strict=True):
            if not info.is_dir() and len(examples) < 3:
                examples.append(name)
            if not name or info.is_dir() or not regex.match(name):
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"{label}: refused, member {name!r} is a link; archives must hold plain files")
            if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                raise ArchiveError(f"{label}: refused, member {name!r} is not a regular file")
            if name in seen:
                raise ArchiveError(f"{label}: refused, member {name!r} appears twice")
            seen.add(name)
            chosen.append((info, name))
        # Header sizes can lie; they only allow an early refusal, the budget is what counts.
        if sum(i.file_size for i, _ in chosen) > max_bytes:
            budget.spend(max_bytes + 1)
        for info, name in chosen:
            with zf.open(info) as f:
                sink(name, _chunks(f, budget))
    return len(chosen)
