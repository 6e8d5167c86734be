"""Fetching bytes over HTTP(S) or ``file://``, with pip's network settings.

Proxies come from pip's ``proxy`` setting or the standard ``HTTP(S)_PROXY`` /
``NO_PROXY`` variables, TLS trust from pip's ``cert`` (else the system store),
and ``trusted-host`` entries skip certificate checks as they do in pip.
Downloads go into a ``.part`` file that later attempts continue with an HTTP
Range request, so an interrupted transfer is never started over.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import (
    HTTPSHandler,
    OpenerDirector,
    ProxyHandler,
    Request,
    build_opener,
    url2pathname,
)

from tqdm import tqdm

from chargen.errors import ChargenError

T = TypeVar("T")
USER_AGENT = "chargen-download/1"
CHUNK = 1 << 16


class FetchError(ChargenError):
    """A transfer failed in a way retrying will not fix (or retries ran out)."""

    def __init__(self, message: str, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # short form, for listing several failures on one line
        self.status = status


class NotFoundError(FetchError):
    """The server (or file system) says there is nothing at that URL."""


class _Transient(Exception):
    """A failure worth retrying: connection refused/reset, timeout, 5xx, cut-off body."""


@dataclass(frozen=True)
class Page:
    body: bytes
    content_type: str
    url: str  # after redirects, for resolving relative links


class Fetcher:
    """One configured client: proxies, CA bundle, trusted hosts, timeout and retries."""

    def __init__(self, *, proxy: str | None = None, cert: str | None = None,
                 trusted_hosts: tuple[str, ...] = (), timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5) -> None:
        # None lets urllib read HTTP(S)_PROXY/NO_PROXY from the environment, as pip does.
        proxies = {"http": proxy, "https": proxy} if proxy else None
        self._verified = build_opener(ProxyHandler(proxies), HTTPSHandler(context=_ssl_context(cert)))
        self._unverified = build_opener(
            ProxyHandler(proxies), HTTPSHandler(context=ssl._create_unverified_context())
        )
        self.trusted_hosts = trusted_hosts
        self.timeout_s = timeout_s
        self.retries = max(0, retries)
        self.backoff_s = backoff_s

    # ----------------------------------------------------------------- small reads

    def read(self, url: str, accept: str | None = None) -> Page:
        """GET a small resource (an index page) into memory."""
        if url.startswith("file:"):
            path = _file_path(url)
            if path.is_dir():  # pip reads index.html from a directory index
                path = path / "index.html"
            if not path.is_file():
                raise NotFoundError(f"{path} does not exist", "no such file")
            return Page(path.read_bytes(), "text/html", url)

        def attempt() -> Page:
            headers = {"Accept": accept} if accept else {}
            with self._open(url, headers) as resp:
                body = _read_all(resp, url)
                return Page(body, resp.headers.get("Content-Type", ""), resp.geturl())

        return self._retrying(url, attempt, "check the URL, your network and proxy settings")

    # ----------------------------------------------------------------- downloads

    def download(self, url: str, part: Path, label: str) -> None:
        """Fetch ``url`` into ``part``, continuing whatever ``part`` already holds."""
        part.parent.mkdir(parents=True, exist_ok=True)
        if url.startswith("file:"):
            src = _file_path(url)
            if not src.is_file():
                raise NotFoundError(f"{src} does not exist; check the index that lists it")
            shutil.copyfile(src, part)
            return
        self._retrying(url, lambda: self._download_once(url, part, label),
                       "check the URL, your network and proxy settings, then run again to resume")

    def _download_once(self, url: str, part: Path, label: str) -> None:
        have = part.stat().st_size if part.exists() else 0
        validator = _validator_path(part)
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be offsets into the file
        if have:
            headers["Range"] = f"bytes={have}-"
            if validator.is_file():
                # If the file changed since the partial began, the server sends it whole.
                headers["If-Range"] = validator.read_text(encoding="utf-8").strip()
        try:
            resp = self._open(url, headers)
        except FetchError as e:
            if have and e.status == 416:
                # The .part is stale (or already whole); either way start clean.
                discard_partial(part)
                return self._download_once(url, part, label)
            raise
        with resp:
            total = None
            if resp.status == 206:
                start, total = _content_range(resp.headers.get("Content-Range", ""))
                if start != have:  # not the range asked for: start over rather than guess
                    resp.close()
                    discard_partial(part)
                    return self._download_once(url, part, label)
                mode = "ab"
            else:
                have = 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                mode = "wb"
                tag = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
                if tag and not tag.startswith("W/"):  # weak tags cannot guard byte ranges
                    validator.write_text(tag, encoding="utf-8")
                else:
                    validator.unlink(missing_ok=True)
            with open(part, mode) as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=label, file=sys.stderr, mininterval=0.5,
            ) as bar:
                got = have
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Transient(f"connection lost after {got} bytes ({e})") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if total is not None and got < total:
                raise _Transient(f"connection closed after {got} of {total} bytes")

    # ----------------------------------------------------------------- plumbing

    def _retrying(self, url: str, attempt: Callable[[], T], hint: str) -> T:
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _Transient as e:
                if n == self.retries:
                    tries = f"{n + 1} attempt{'s' if n else ''}"
                    raise FetchError(f"{url}: {e} ({tries}); {hint}",
                                     reason=f"{e} ({tries})") from None
                time.sleep(min(self.backoff_s * 2**n, 10.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def _open(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        host = urlsplit(url).netloc.rpartition("@")[2]
        opener: OpenerDirector = self._verified
        if host in self.trusted_hosts or host.partition(":")[0] in self.trusted_hosts:
            opener = self._unverified
        req = Request(url, headers={"User-Agent": USER_AGENT, **headers})
        try:
            return opener.open(req, timeout=self.timeout_s)
        except HTTPError as e:
            e.close()
            short = f"HTTP {e.code} {e.reason}"
            if e.code in (404, 410):
                raise NotFoundError(f"{short} for {url}; check the URL", short, e.code) from None
            if e.code == 429 or e.code >= 500:
                raise _Transient(short) from None
            raise FetchError(f"{short} for {url}; check the URL", short, e.code) from None
        except URLError as e:
            reason = e.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                short = f"TLS certificate of {host} was not accepted ({reason.verify_message})"
                raise FetchError(
                    f"{short}; point pip's 'cert' setting (PIP_CERT) at your CA bundle", short
                ) from None
            raise _Transient(f"cannot reach {host} ({reason})") from None
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, bad status lines
            raise _Transient(f"cannot reach {host} ({e or type(e).__name__})") from None


def _ssl_context(cert: str | None) -> ssl.SSLContext:
    if not cert:
        return ssl.create_default_context()
    if os.path.isdir(cert):
        return ssl.create_default_context(capath=cert)
    if not os.path.isfile(cert):
        raise FetchError(f"pip's 'cert' setting points to {cert}, which does not exist; fix or unset it")
    return ssl.create_default_context(cafile=cert)


def _read_all(resp: http.client.HTTPResponse, url: str) -> bytes:
    try:
        body = resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(f"connection lost while reading ({e})") from None
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and len(body) < int(length):
        raise _Transient(f"connection closed after {len(body)} of {length} bytes")
    return body


def _content_range(value: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value)
    if not m:
        return -1, None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".etag")


def discard_partial(part: Path) -> None:
    """Remove a partial download and what was remembered about it."""
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)


def _file_path(url: str) -> Path:
    return Path(url2pathname(urlsplit(url).path))
