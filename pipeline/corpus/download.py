"""The download stage: corpus sources in, one UTF-8 text per document out.

Each source is fetched (or read from disk), verified against its sha256 before
anything else touches it, kept in a content-addressed cache so a re-run does
not download again, and turned into documents under ``out_dir`` together with
``manifest.json``.  Documents are UTF-8 with ``\\n`` line ends and no BOM.
The output directory is swapped in only when every source succeeded.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from chargen.errors import ChargenError
from pipeline.corpus import arithmetic
from pipeline.corpus.archive import archive_kind, glob_regex, literal_prefix, read_members
from pipeline.corpus.fetch import Fetcher, discard_partial
from pipeline.corpus.manifest import MANIFEST
from pipeline.corpus.package_index import (
    PackageIndexError,
    PipConfig,
    find_distribution,
    read_pip_config,
)
from pipeline.files import atomic_dir, write_json
from pipeline.params import ArithmeticParams, DownloadParams, Source

DEFAULT_DIR_MEMBERS = "**/*.txt"


class DownloadError(ChargenError):
    """A source could not be fetched, verified or turned into text."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class Fetched:
    """A verified file, ready to be read."""

    path: Path
    filename: str
    url: str | None
    sha256: str
    origin: str  # "downloaded", "cache" or "local"


class DownloadCache:
    """Files stored by sha256 under ``root/sha256/<hash>/<filename>``.

    ``root/partial`` holds interrupted transfers (resumed next time) and
    ``root/urls`` remembers the hash an unpinned source resolved to.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def lookup(self, sha256: str) -> Fetched | None:
        meta_path = self.root / "sha256" / f"{sha256}.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            path = self.root / "sha256" / sha256 / meta["filename"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not path.is_file() or sha256_file(path) != sha256:
            # Corrupt or half-deleted entry: forget it so it is fetched again.
            shutil.rmtree(path.parent, ignore_errors=True)
            meta_path.unlink(missing_ok=True)
            return None
        return Fetched(path, meta["filename"], meta.get("url"), sha256, "cache")

    def store(self, part: Path, sha256: str, filename: str, url: str) -> Fetched:
        entry = self.root / "sha256" / sha256
        entry.mkdir(parents=True, exist_ok=True)
        path = entry / filename
        os.replace(part, path)
        write_json(self.root / "sha256" / f"{sha256}.json", {"filename": filename, "url": url})
        return Fetched(path, filename, url, sha256, "downloaded")

    def part_for(self, url: str) -> Path:
        return self.root / "partial" / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".part")

    def remembered(self, key: str) -> str | None:
        try:
            return (self.root / "urls" / self._key(key)).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def remember(self, key: str, sha256: str) -> None:
        path = self.root / "urls" / self._key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sha256 + "\n", encoding="utf-8")

    @staticmethod
    def _key(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()


class _Network:
    """pip's configuration and a client built from it, created only when first needed."""

    def __init__(self, params: DownloadParams) -> None:
        self.params = params
        self._config: PipConfig | None = None
        self._fetcher: Fetcher | None = None

    def pip_config(self) -> PipConfig:
        if self._config is None:
            self._config = read_pip_config()
        return self._config

    def fetcher(self) -> Fetcher:
        if self._fetcher is None:
            try:
                cfg = self.pip_config()
                self._fetcher = cfg.fetcher(self.params.timeout_s, self.params.retries)
            except PackageIndexError:
                # A plain URL needs no index; without pip use the environment's proxies.
                self._fetcher = Fetcher(timeout_s=self.params.timeout_s, retries=self.params.retries)
        return self._fetcher


def _where(src: Source) -> str:
    return f"download.sources[{src.name}]"


def fetch_remote(src: Source, cache: DownloadCache, net: _Network) -> Fetched:
    """Fetch an index or URL source through the cache, verifying its sha256."""
    pinned = src.sha256.lower() if src.sha256 else None
    key = src.index or src.url or ""
    known = pinned or cache.remembered(key)
    hit = cache.lookup(known) if known else None
    if hit is None:
        hit = _download(src, pinned, key, cache, net)
    if not pinned:
        warn(f"{_where(src)} has no sha256; {hit.filename} has sha256 {hit.sha256} — "
             f"add 'sha256: {hit.sha256}' to pin it")
    return hit


def _download(src: Source, pinned: str | None, key: str, cache: DownloadCache,
              net: _Network) -> Fetched:
    if src.index:
        dist = find_distribution(src.index, net.pip_config(), net.fetcher(), pinned)
        if pinned and dist.sha256 and dist.sha256 != pinned:
            raise DownloadError(
                f"{_where(src)}: the index lists {dist.filename} with sha256 {dist.sha256}, "
                f"but params.yaml pins {pinned}; check the pin and the index"
            )
        url, filename = dist.url, safe_filename(dist.filename)
        expected, why = (pinned, "pinned in params.yaml") if pinned else (dist.sha256, "listed by the index")
    else:
        url = src.url or ""
        filename = safe_filename(unquote(PurePosixPath(urlsplit(url).path).name))
        expected, why = pinned, "pinned in params.yaml"
    part = cache.part_for(url)
    net.fetcher().download(url, part, label=f"{src.name}: {filename}")
    actual = sha256_file(part)
    if expected and actual != expected:
        discard_partial(part)  # a bad file is never kept, so the next run fetches afresh
        raise DownloadError(
            f"{_where(src)}: sha256 mismatch for {filename}: expected {expected} ({why}), "
            f"got {actual}; the file was discarded — check the source and its sha256"
        )
    fetched = cache.store(part, actual, filename, url)
    discard_partial(part)
    cache.remember(key, actual)
    return fetched


def safe_filename(name: str) -> str:
    """A remote file name made safe to use as one path segment in the cache and output."""
    name = re.sub(r"[/\\\x00-\x1f]", "_", name).strip()
    return name if name not in ("", ".", "..") else "download"


def fetch_local(src: Source) -> Fetched:
    path = Path(src.path or "").expanduser()
    if not path.exists():
        raise DownloadError(f"{_where(src)}.path: {path} does not exist; fix the path")
    if path.is_dir():
        return Fetched(path, path.name, None, "", "local")
    actual = sha256_file(path)
    if src.sha256 and actual != src.sha256.lower():
        raise DownloadError(
            f"{_where(src)}: sha256 mismatch for {path}: expected {src.sha256.lower()} "
            f"(pinned in params.yaml), got {actual}; check the file and its sha256"
        )
    return Fetched(path, path.name, None, actual, "local")


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Document:
    name: str
    file: str  # relative to the output directory
    source: str
    sha256: str
    bytes: int
    chars: int
    split: str | None = None  # the split the whole document belongs to; None: cut by position
    line_records: bool = False  # each line is a record of its own (needs a split)

    def entry(self) -> dict[str, object]:
        """The document's manifest entry; the optional fields only where they are set."""
        d = dict(self.__dict__)
        if self.split is None:
            del d["split"], d["line_records"]
        return d


def write_text(chunks: Iterable[bytes], dest: Path, label: str) -> tuple[str, int, int]:
    """Stream UTF-8 bytes to ``dest`` with ``\\n`` line ends and no BOM.

    Returns (sha256, bytes, chars) of what was written; raises naming the byte
    offset of the first invalid sequence.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    h = hashlib.sha256()
    fed = n_bytes = n_chars = 0
    held_cr = False  # a trailing "\r" waits to see whether "\n" follows in the next chunk
    started = False
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:

        def emit(text: str) -> None:
            nonlocal held_cr, started, n_bytes, n_chars
            if held_cr:
                text = "\r" + text
                held_cr = False
            if text.endswith("\r"):
                text, held_cr = text[:-1], True
            if not started and text:
                text = text.removeprefix("\ufeff")
                started = True
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            data = text.encode("utf-8")
            out.write(data)
            h.update(data)
            n_bytes += len(data)
            n_chars += len(text)

        def decode(chunk: bytes, final: bool) -> str:
            try:
                return decoder.decode(chunk, final)
            except UnicodeDecodeError as e:
                buffered = len(e.object) - len(chunk)
                offset = fed - buffered + e.start
                raise DownloadError(
                    f"{label} is not valid UTF-8 at byte offset {offset} ({e.reason}); "
                    "convert it to UTF-8 or leave it out of the source"
                ) from None

        for chunk in chunks:
            emit(decode(chunk, False))
            fed += len(chunk)
        emit(decode(b"", True))
        if held_cr:
            held_cr = False
            emit("\n")
    return h.hexdigest(), n_bytes, n_chars


def _relative_name(member: str, pattern: str) -> str:
    prefix = literal_prefix(pattern)
    rel = member[len(prefix):] if prefix and member.startswith(prefix) else member
    return rel if rel.lower().endswith(".txt") else rel + ".txt"


class _DocumentWriter:
    """Collects one source's documents into the output directory."""

    def __init__(self, out: Path, src: Source) -> None:
        self.out, self.src = out, src
        self.documents: list[Document] = []

    def add(self, rel: str, chunks: Iterable[bytes], label: str, split: str | None = None) -> None:
        """Write one document; a ``split`` marks it as held whole by that split, one record per line."""
        file = f"{self.src.name}/{rel}"
        dest = self.out / file
        if dest.exists():
            raise DownloadError(f"{_where(self.src)}: two documents would both be written to {file}")
        digest, n_bytes, n_chars = write_text(chunks, dest, label)
        if n_chars == 0:
            dest.unlink()
            warn(f"{label} is empty; skipped")
            return
        name = file[:-4] if file.lower().endswith(".txt") else file
        self.documents.append(Document(name, file, self.src.name, digest, n_bytes, n_chars,
                                       split=split, line_records=split is not None))


def generate_documents(src: Source, spec: ArithmeticParams, out: Path) -> list[Document]:
    """Write a generated source's documents under ``out``: one per split, one record per line."""
    writer = _DocumentWriter(out, src)
    for split, text in arithmetic.generate(spec).items():
        writer.add(f"{split}.txt", [text.encode("ascii")], f"{_where(src)} ({split})", split=split)
    return writer.documents


def extract_documents(src: Source, fetched: Fetched, out: Path, max_extract_mb: int) -> list[Document]:
    """Turn one fetched source into documents under ``out``."""
    writer = _DocumentWriter(out, src)
    kind = archive_kind(fetched.filename)
    if fetched.path.is_dir():
        pattern = src.members or DEFAULT_DIR_MEMBERS
        regex = glob_regex(pattern)
        files = sorted(p for p in fetched.path.rglob("*")
                       if p.is_file() and regex.match(p.relative_to(fetched.path).as_posix()))
        if not files:
            raise DownloadError(f"{_where(src)}: the members glob {pattern!r} matches nothing in "
                                f"{fetched.path}; fix 'members'")
        for p in files:
            rel = p.relative_to(fetched.path).as_posix()
            with open(p, "rb") as f:
                writer.add(_relative_name(rel, pattern), iter(lambda f=f: f.read(1 << 20), b""), str(p))
    elif kind:
        if not src.members:
            raise DownloadError(
                f"{_where(src)}: {fetched.filename} is an archive; add 'members:' with a glob "
                "naming the text files to keep (e.g. 'project-1.0/**/*.txt')"
            )
        pattern = src.members

        def sink(member: str, chunks: Iterable[bytes]) -> None:
            writer.add(_relative_name(member, pattern), chunks, f"{fetched.filename}:{member}")

        read_members(fetched.path, pattern, max_extract_mb << 20, sink,
                     label=f"{_where(src)} ({fetched.filename})")
    else:
        if src.members:
            raise DownloadError(
                f"{_where(src)}: 'members' only applies to archives and directories, but "
                f"{fetched.filename} is a plain file; remove 'members'"
            )
        with open(fetched.path, "rb") as f:
            rel = fetched.filename if fetched.filename.lower().endswith(".txt") else fetched.filename + ".txt"
            writer.add(rel, iter(lambda: f.read(1 << 20), b""), f"{_where(src)} ({fetched.filename})")
    return writer.documents


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class Summary:
    documents: int
    chars: int
    downloaded: int
    cached: int
    out_dir: str


def run_download(params: DownloadParams) -> Summary:
    """Fetch every source, then build ``out_dir`` with its documents and manifest."""
    cache = DownloadCache(params.cache_dir)
    net = _Network(params)
    fetched = {src.name: fetch_local(src) if src.path else fetch_remote(src, cache, net)
               for src in params.sources if src.arithmetic is None}

    documents: list[Document] = []
    sources = []
    with atomic_dir(params.out_dir) as out:
        for src in params.sources:
            if src.arithmetic is not None:
                docs = generate_documents(src, src.arithmetic, out)
                sources.append({"name": src.name, "kind": "arithmetic",
                                "spec": dataclasses.asdict(src.arithmetic), "documents": len(docs)})
            else:
                docs = extract_documents(src, fetched[src.name], out, params.max_extract_mb)
                sources.append(_source_entry(src, fetched[src.name], len(docs)))
            documents.extend(docs)
        if sum(d.chars for d in documents) == 0:
            raise DownloadError("the corpus is empty: no source yielded any text; check download.sources")
        documents.sort(key=lambda d: d.file)
        write_json(out / MANIFEST, {
            "documents": [d.entry() for d in documents],
            "sources": sources,
        })
    return Summary(
        documents=len(documents),
        chars=sum(d.chars for d in documents),
        downloaded=sum(f.origin == "downloaded" for f in fetched.values()),
        cached=sum(f.origin == "cache" for f in fetched.values()),
        out_dir=params.out_dir,
    )


def _source_entry(src: Source, f: Fetched, n_docs: int) -> dict[str, object]:
    kind = "index" if src.index else "url" if src.url else "path"
    return {
        "name": src.name,
        "kind": kind,
        "spec": src.index or src.url or src.path,
        "url": f.url,
        "filename": f.filename,
        "sha256": f.sha256 or None,
        "pinned": bool(src.sha256),
        "bytes": None if f.path.is_dir() else f.path.stat().st_size,
        "members": src.members,
        "documents": n_docs,
    }

