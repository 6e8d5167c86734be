"""A real HTTP(S) server on 127.0.0.1 for tests.

Serves static files with Range support, a PEP 503 (HTML) or PEP 691 (JSON)
simple index, can cut a transfer off mid-way or answer with an error status,
acts as a forward proxy for absolute-URI requests, and records every request
so tests can check what the client actually sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    proxied: bool  # the request line carried an absolute URI, as sent to a proxy


@dataclass
class _State:
    files: dict[str, bytes] = field(default_factory=dict)
    projects: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> filename -> sha256
    cut_offs: dict[str, list[int]] = field(default_factory=dict)  # path -> [bytes to send, times]
    failures: dict[str, int] = field(default_factory=dict)  # path -> status
    json_pages: bool = False
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalServer:
    """``with LocalServer() as srv: srv.add_file("/a.txt", b"...")`` -> ``srv.url + "/a.txt"``."""

    def __init__(self, certfile: str | None = None, keyfile: str | None = None) -> None:
        self.state = _State()
        state = self.state

        class Handler(_Handler):
            pass

        Handler.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    # ----------------------------------------------------------------- content

    def add_file(self, path: str, data: bytes) -> str:
        self.state.files[path] = data
        return self.url + path

    def add_project(self, name: str, files: dict[str, bytes], *, hashes: bool = True,
                    listed_sha256: dict[str, str] | None = None) -> None:
        """List ``files`` on ``/simple/<name>/`` (served from ``/files/``)."""
        listed = {}
        for filename, data in files.items():
            self.state.files[f"/files/{filename}"] = data
            digest = hashlib.sha256(data).hexdigest()
            listed[filename] = (listed_sha256 or {}).get(filename, digest) if hashes else ""
        self.state.projects[normalize(name)] = listed

    def use_json_pages(self, on: bool = True) -> None:
        self.state.json_pages = on

    def cut_off(self, path: str, after_bytes: int, times: int = 1) -> None:
        """The next ``times`` responses for ``path`` stop after ``after_bytes`` body bytes."""
        self.state.cut_offs[path] = [after_bytes, times]

    def fail(self, path: str, status: int) -> None:
        self.state.failures[path] = status

    def requests_for(self, path: str) -> list[Seen]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path == path]


class _Handler(BaseHTTPRequestHandler):
    state: _State
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        proxied = self.path.startswith(("http://", "https://"))
        path = unquote(urlsplit(self.path).path) if proxied else unquote(self.path.split("?")[0])
        with self.state.lock:
            self.state.requests.append(Seen("GET", path, dict(self.headers.items()), proxied))
        if path in self.state.failures:
            return self._send(self.state.failures[path], b"failure requested by the test\n")
        if path in ("/simple", "/simple/"):
            links = "".join(f'<a href="{n}/">{n}</a>\n' for n in sorted(self.state.projects))
            return self._send(200, f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode(),
                              "text/html")
        m = re.fullmatch(r"/simple/([^/]+)/?", path)
        if m:
            return self._project_page(m.group(1))
        data = self.state.files.get(path)
        if data is None:
            return self._send(404, b"not found\n")
        self._file(path, data)

    def _project_page(self, name: str) -> None:
        if name != normalize(name):  # pip's behaviour: the canonical page lives elsewhere
            return self._send(404, b"not found\n")
        files = self.state.projects.get(name)
        if files is None:
            return self._send(404, b"not found\n")
        if self.state.json_pages and "application/vnd.pypi.simple.v1+json" in self.headers.get("Accept", ""):
            doc = {"meta": {"api-version": "1.0"}, "name": name, "files": [
                {"filename": f, "url": f"../../files/{f}", "hashes": {"sha256": h} if h else {}}
                for f, h in files.items()]}
            return self._send(200, json.dumps(doc).encode(), "application/vnd.pypi.simple.v1+json")
        links = "".join(
            f'<a href="../../files/{f}{"#sha256=" + h if h else ""}">{f}</a><br/>\n'
            for f, h in files.items()
        )
        body = f"<!DOCTYPE html><html><body><h1>Links for {name}</h1>\n{links}</body></html>\n"
        self._send(200, body.encode(), "text/html")

    def _file(self, path: str, data: bytes) -> None:
        start, status = 0, 200
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and if_range is not None and if_range != etag:
            rng = None  # the file changed since the client's partial copy: send it whole
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            status, body = 206, data[start:end]
        else:
            body = data
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.end_headers()
        with self.state.lock:
            cut = self.state.cut_offs.get(path)
            if cut and cut[1] > 0:
                cut[1] -= 1
                body = body[: cut[0]]
                self.close_connection = True
            else:
                cut = None
        self.wfile.write(body)
        if cut:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
