"""Finding a distribution on the Python package index the way pip would.

The index, extra indexes, proxy and CA bundle come from pip's own configuration
(``python -m pip config list``: config files and ``PIP_*`` environment variables),
falling back to pip's built-in default index, so no host name lives in this code.
Project pages are PEP 503 HTML or PEP 691 JSON; only the file listing is used:
nothing from the distribution is ever built or run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePosixPath
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

from chargen.errors import ChargenError
from pipeline.corpus.fetch import Fetcher, FetchError, NotFoundError

# Same preference order pip sends: JSON first, HTML as the fallback.
ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)
SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tar.xz", ".tgz")


class PackageIndexError(ChargenError):
    """The distribution could not be found, or pip's configuration could not be read."""


@dataclass(frozen=True)
class PipConfig:
    """The subset of pip's settings that decides where and how files are fetched."""

    index_url: str
    extra_index_urls: tuple[str, ...] = ()
    no_index: bool = False
    proxy: str | None = None
    cert: str | None = None
    trusted_hosts: tuple[str, ...] = ()

    @property
    def index_urls(self) -> tuple[str, ...]:
        """Indexes to search, in order; none when pip is told ``no-index``."""
        return () if self.no_index else (self.index_url, *self.extra_index_urls)

    def fetcher(self, timeout_s: float, retries: int) -> Fetcher:
        return Fetcher(proxy=self.proxy, cert=self.cert, trusted_hosts=self.trusted_hosts,
                       timeout_s=timeout_s, retries=retries)


@dataclass(frozen=True)
class Distribution:
    """One file listed on an index project page."""

    filename: str
    url: str
    sha256: str | None  # from the link's ``#sha256=`` fragment or PEP 691 ``hashes``
    kind: str  # "sdist" or "wheel"
    index_url: str


# --------------------------------------------------------------------------- pip config


def read_pip_config(python: str = sys.executable) -> PipConfig:
    """Ask pip for its effective configuration, as ``pip download`` would see it."""
    try:
        out = subprocess.run(
            [python, "-m", "pip", "config", "list"],
            capture_output=True, text=True, check=True, timeout=120,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise PackageIndexError(
            f"could not read pip's configuration with '{python} -m pip config list' ({e}); "
            "install pip in this environment or use a url/path source"
        ) from None
    values = effective_settings(out)
    index_url = values.get("index-url") or default_index_url()
    return PipConfig(
        index_url=index_url,
        extra_index_urls=tuple(values.get("extra-index-url", "").split()),
        no_index=_truthy(values.get("no-index", "")),
        proxy=values.get("proxy") or None,
        cert=values.get("cert") or None,
        trusted_hosts=tuple(values.get("trusted-host", "").split()),
    )


def effective_settings(config_list: str, command: str = "download") -> dict[str, str]:
    """Merge ``pip config list`` output the way pip's option parser does.

    Lines look like ``global.index-url='...'`` or ``:env:.proxy='...'``.  pip
    applies the ``global`` section, then the command's own section, then the
    environment, each overriding the one before.
    """
    sections: dict[str, dict[str, str]] = {}
    for line in config_list.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        section, _, name = key.rpartition(".")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        sections.setdefault(section, {})[name] = str(value)
    merged: dict[str, str] = {}
    for section in ("global", command, ":env:"):
        merged.update(sections.get(section, {}))
    return merged


def default_index_url() -> str:
    """pip's built-in index, read from pip itself so that no host is written here."""
    try:
        from pip._internal.models.index import PyPI
    except ImportError:
        raise PackageIndexError(
            "pip is not installed in this environment, so the default package index is "
            "unknown; install pip or set PIP_INDEX_URL"
        ) from None
    return PyPI.simple_url


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- project pages


def normalize_name(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(spec: str) -> tuple[str, str]:
    """``"NAME==VERSION"`` -> (name, version)."""
    name, _, version = spec.partition("==")
    name, version = name.strip(), version.strip()
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", name) or not version:
        raise PackageIndexError(f"expected 'NAME==VERSION', got {spec!r}")
    return name, version


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.base: str | None = None
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "base" and a.get("href") and self.base is None:
            self.base = a["href"]
        elif tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])  # type: ignore[arg-type]


def parse_project_page(body: bytes, content_type: str, page_url: str) -> list[tuple[str, str, str | None]]:
    """Files on a project page as (filename, absolute url, sha256 or None)."""
    if "json" in content_type:
        try:
            doc = json.loads(body)
            files = [(f["filename"], urljoin(page_url, f["url"]), f.get("hashes", {}).get("sha256"))
                     for f in doc["files"]]
        except (ValueError, KeyError, TypeError):
            raise PackageIndexError(f"{page_url}: not a valid PEP 691 project page") from None
        return files
    parser = _LinkParser()
    parser.feed(body.decode("utf-8", errors="replace"))
    base = urljoin(page_url, parser.base) if parser.base else page_url
    files = []
    for href in parser.hrefs:
        url, fragment = urldefrag(urljoin(base, href))
        filename = unquote(PurePosixPath(urlsplit(url).path).name)
        digest = None
        if fragment.startswith("sha256="):
            digest = fragment.removeprefix("sha256=").lower()
        files.append((filename, url, digest))
    return files


def _file_kind(filename: str, name: str, version: str) -> str | None:
    """"sdist"/"wheel" when ``filename`` is that project's file for exactly ``version``."""
    want = normalize_name(name)
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        if len(parts) in (5, 6) and normalize_name(parts[0]) == want and parts[1] == version:
            return "wheel"
        return None
    for suffix in SDIST_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            project, _, ver = stem.rpartition("-")
            if project and normalize_name(project) == want and ver == version:
                return "sdist"
    return None


def pick_distribution(files: list[tuple[str, str, str | None]], name: str, version: str,
                      index_url: str, pinned_sha256: str | None = None) -> Distribution | None:
    """The file to fetch: the one matching the pinned hash, else the sdist, else a pure wheel."""
    candidates = []
    for filename, url, digest in files:
        kind = _file_kind(filename, name, version)
        if kind:
            candidates.append(Distribution(filename, url, digest, kind, index_url))
    if not candidates:
        return None
    if pinned_sha256:
        for d in candidates:
            if d.sha256 == pinned_sha256:
                return d

    def rank(d: Distribution) -> tuple[bool, bool, bool, str]:
        return (d.kind != "sdist", not d.filename.endswith(".tar.gz"),
                not d.filename.endswith("-none-any.whl"), d.filename)

    return sorted(candidates, key=rank)[0]


def find_distribution(spec: str, config: PipConfig, fetcher: Fetcher,
                      pinned_sha256: str | None = None) -> Distribution:
    """Search the index, then each extra index in order, for ``NAME==VERSION``."""
    name, version = parse_requirement(spec)
    if not config.index_urls:
        raise PackageIndexError(
            f"{spec}: pip is configured with no-index, so no package index can be searched; "
            "unset it or use a url/path source"
        )
    tried = []
    for index_url in config.index_urls:
        page_url = index_url.rstrip("/") + "/" + normalize_name(name) + "/"
        try:
            page = fetcher.read(page_url, accept=ACCEPT)
        except NotFoundError:
            tried.append(f"{index_url} (no such project)")
            continue
        except FetchError as e:
            tried.append(f"{index_url} ({e.reason})")
            continue
        files = parse_project_page(page.body, page.content_type, page.url)
        dist = pick_distribution(files, name, version, index_url, pinned_sha256)
        if dist:
            return dist
        tried.append(f"{index_url} (no {version} sdist or wheel)")
    raise PackageIndexError(
        f"{spec} was not found on any configured index; tried: {'; '.join(tried)}. Check the "
        "name and version, pip's index-url/extra-index-url, and its proxy/cert for unreachable indexes"
    )
