"""The download stage against a real HTTP server, real pip configuration and real files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import project_params, run_stage_script
from localserver import LocalServer, free_port

from chargen.errors import ChargenError
from pipeline.corpus.download import DownloadError, run_download, write_text
from pipeline.corpus.package_index import effective_settings, pick_distribution, read_pip_config
from pipeline.params import DownloadParams, ParamsError, Source

ROOT = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def clean_env(monkeypatch):
    """pip sees no config files and no proxies: only what a test sets."""
    for k in list(os.environ):
        if k.startswith("PIP_") or k.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server(clean_env):
    with LocalServer() as srv:
        yield srv


def params(tmp_path: Path, *sources: dict, **kw) -> DownloadParams:
    kw = {**project_params()["download"], "retries": 0, "timeout_s": 10, **kw}
    kw.update(sources=tuple(Source(**s) for s in sources), out_dir=str(tmp_path / "raw"),
              cache_dir=str(tmp_path / "cache"))
    return DownloadParams(**kw)


def write_download_params(project: Path, **download) -> None:
    """A complete params.yaml whose download section is changed by ``download``."""
    params = project_params()
    params["download"].update(download)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def manifest(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "raw" / "manifest.json").read_text(encoding="utf-8"))


def make_sdist(tmp_path: Path, name: str, version: str, files: dict[str, bytes]) -> bytes:
    """A source distribution whose setup.py would leave a marker if anything ran it."""
    marker = tmp_path / "SETUP_PY_WAS_RUN"
    files = {**files, "setup.py": f"open({str(marker)!r}, 'w').write('ran')\n".encode()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{name}-{version}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --------------------------------------------------------------------------- URL sources


def test_url_source_is_verified_normalised_and_cached(server, tmp_path):
    data = "\ufeffTo be, or not to be:\r\nthat is the question.\r\n".encode()
    url = server.add_file("/corpus/hamlet.txt", data)
    p = params(tmp_path, {"name": "play", "url": url, "sha256": sha(data)})

    run_download(p)
    m = manifest(tmp_path)
    text = "To be, or not to be:\nthat is the question.\n"
    assert (tmp_path / "raw" / "play" / "hamlet.txt").read_text(encoding="utf-8") == text
    assert m["documents"] == [{"name": "play/hamlet", "file": "play/hamlet.txt", "source": "play",
                               "sha256": sha(text.encode()), "bytes": len(text), "chars": len(text)}]
    assert m["sources"][0]["sha256"] == sha(data) and m["sources"][0]["pinned"] is True

    summary = run_download(p)  # second run: served from the cache, no request at all
    assert (summary.downloaded, summary.cached) == (0, 1)
    assert len(server.requests_for("/corpus/hamlet.txt")) == 1
    assert manifest(tmp_path) == m


def test_unpinned_url_warns_with_the_hash_to_pin(server, tmp_path, capsys):
    data = b"Some text.\n"
    url = server.add_file("/t.txt", data)
    run_download(params(tmp_path, {"name": "t", "url": url}))
    err = capsys.readouterr().err
    assert f"sha256: {sha(data)}" in err and "download.sources[t]" in err
    assert manifest(tmp_path)["sources"][0]["sha256"] == sha(data)
    assert manifest(tmp_path)["sources"][0]["pinned"] is False


def test_hash_mismatch_names_both_hashes_and_keeps_nothing(server, tmp_path):
    data = b"tampered\n"
    url = server.add_file("/t.txt", data)
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=f"expected {wrong}.*got {sha(data)}"):
        run_download(params(tmp_path, {"name": "t", "url": url, "sha256": wrong}))
    assert not (tmp_path / "raw").exists()
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached == []


def test_http_error_leaves_previous_output_alone(server, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "manifest.json").write_text("previous")
    with pytest.raises(ChargenError, match="HTTP 404"):
        run_download(params(tmp_path, {"name": "t", "url": server.url + "/missing.txt"}))
    server.fail("/boom.txt", 503)
    with pytest.raises(ChargenError, match="HTTP 503"):
        run_download(params(tmp_path, {"name": "t", "url": server.url + "/boom.txt"}))
    assert (tmp_path / "raw" / "manifest.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "raw"]  # no temp dirs left


def test_unreachable_port_is_a_clear_error(clean_env, tmp_path):
    port = free_port()
    with pytest.raises(ChargenError, match=f"cannot reach 127.0.0.1:{port}.*proxy settings"):
        run_download(params(tmp_path, {"name": "t", "url": f"http://127.0.0.1:{port}/x.txt"}))


def test_cut_off_transfer_resumes_with_range(server, tmp_path):
    text = ("line of text\n" * 25_000).encode()
    server.add_file("/big.txt", text)
    server.cut_off("/big.txt", after_bytes=100_000)
    p = params(tmp_path, {"name": "big", "url": server.url + "/big.txt", "sha256": sha(text)})

    with pytest.raises(ChargenError, match=r"closed after 100000 of 325000 bytes.*resume"):
        run_download(p)
    parts = list((tmp_path / "cache" / "partial").glob("*.part"))
    assert [f.stat().st_size for f in parts] == [100_000]

    run_download(p)
    ranges = [r.headers.get("Range") for r in server.requests_for("/big.txt")]
    assert ranges == [None, "bytes=100000-"]
    assert (tmp_path / "raw" / "big" / "big.txt").read_bytes() == text
    assert not list((tmp_path / "cache" / "partial").iterdir())


def test_retry_resumes_within_one_run(server, tmp_path):
    text = b"abc\n" * 50_000
    server.add_file("/r.txt", text)
    server.cut_off("/r.txt", after_bytes=70_001, times=2)
    p = params(tmp_path, {"name": "r", "url": server.url + "/r.txt", "sha256": sha(text)},
               retries=2)
    run_download(p)
    ranges = [r.headers.get("Range") for r in server.requests_for("/r.txt")]
    assert ranges == [None, "bytes=70001-", "bytes=140002-"]
    assert (tmp_path / "raw" / "r" / "r.txt").read_bytes() == text


def test_proxy_from_pip_config_is_used(server, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_PROXY")
    data = b"through the proxy\n"
    server.add_file("/via.txt", data)
    monkeypatch.setenv("PIP_PROXY", server.url)
    dead = free_port()  # reachable only through the proxy
    run_download(params(tmp_path, {"name": "v", "url": f"http://127.0.0.1:{dead}/via.txt",
                                   "sha256": sha(data)}))
    assert [r.proxied for r in server.requests_for("/via.txt")] == [True]


# --------------------------------------------------------------------------- index sources


def test_index_source_is_found_through_pip_config(server, tmp_path, monkeypatch):
    sdist = make_sdist(tmp_path, "Tiny_Corpus", "1.0", {
        "texts/b_gut.txt": b"Second.\n", "texts/a_gut.txt": b"First.\n", "texts/notes.md": b"no",
    })
    other = make_sdist(tmp_path, "Tiny_Corpus", "1.0.1", {"texts/x_gut.txt": b"wrong version\n"})
    server.add_project("Tiny_Corpus", {"Tiny_Corpus-1.0.tar.gz": sdist,
                                       "tiny_corpus-1.0.1.tar.gz": other})
    monkeypatch.setenv("PIP_INDEX_URL", server.url + "/simple/")
    p = params(tmp_path, {"name": "tiny", "index": "tiny.corpus==1.0", "sha256": sha(sdist),
                          "members": "Tiny_Corpus-1.0/texts/*_gut.txt"})
    run_download(p)
    m = manifest(tmp_path)
    assert [d["file"] for d in m["documents"]] == ["tiny/a_gut.txt", "tiny/b_gut.txt"]
    assert (tmp_path / "raw" / "tiny" / "a_gut.txt").read_text() == "First.\n"
    assert m["sources"][0]["filename"] == "Tiny_Corpus-1.0.tar.gz"
    assert server.requests_for("/simple/tiny-corpus/")  # PEP 503 normalised name
    assert not (tmp_path / "SETUP_PY_WAS_RUN").exists()

    server.use_json_pages()  # PEP 691 JSON pages work too (fresh cache)
    shutil.rmtree(tmp_path / "cache")
    run_download(p)
    assert manifest(tmp_path)["documents"] == m["documents"]


def test_extra_indexes_are_searched_in_order_including_file_urls(server, tmp_path, monkeypatch):
    sdist = make_sdist(tmp_path, "corpus", "2.0", {"t/a.txt": b"from the file index\n"})
    simple = tmp_path / "findex" / "simple" / "corpus"
    simple.mkdir(parents=True)
    (tmp_path / "findex" / "files").mkdir()
    (tmp_path / "findex" / "files" / "corpus-2.0.tar.gz").write_bytes(sdist)
    (simple / "index.html").write_text(
        f'<a href="../../files/corpus-2.0.tar.gz#sha256={sha(sdist)}">corpus-2.0.tar.gz</a>')
    later = make_sdist(tmp_path, "corpus", "2.0", {"t/a.txt": b"from the later index\n"})
    server.add_project("corpus", {"corpus-2.0.tar.gz": later})
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple/")  # down
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL",
                       f"{(tmp_path / 'findex' / 'simple').as_uri()} {server.url}/simple/")
    run_download(params(tmp_path, {"name": "c", "index": "corpus==2.0", "members": "corpus-2.0/t/*.txt"}))
    assert (tmp_path / "raw" / "c" / "a.txt").read_text() == "from the file index\n"


def test_index_source_not_found_lists_what_was_tried(server, tmp_path, monkeypatch):
    server.add_project("corpus", {"corpus-1.0.tar.gz": b"x"})
    monkeypatch.setenv("PIP_INDEX_URL", server.url + "/simple/")
    with pytest.raises(ChargenError, match=r"corpus==9\.9 was not found.*no 9\.9 sdist"):
        run_download(params(tmp_path, {"name": "c", "index": "corpus==9.9", "members": "*"}))
    with pytest.raises(ChargenError, match=r"nothere==1 was not found.*no such project"):
        run_download(params(tmp_path, {"name": "c", "index": "nothere==1", "members": "*"}))


def test_index_hash_disagreeing_with_the_pin_is_refused(server, tmp_path, monkeypatch):
    sdist = make_sdist(tmp_path, "corpus", "1.0", {"a.txt": b"a\n"})
    server.add_project("corpus", {"corpus-1.0.tar.gz": sdist}, listed_sha256={"corpus-1.0.tar.gz": "1" * 64})
    monkeypatch.setenv("PIP_INDEX_URL", server.url + "/simple/")
    with pytest.raises(DownloadError, match=f"lists corpus-1.0.tar.gz with sha256 {'1' * 64}"):
        run_download(params(tmp_path, {"name": "c", "index": "corpus==1.0", "sha256": sha(sdist),
                                       "members": "corpus-1.0/*.txt"}))
    # Unpinned: the index's own hash is the cross-check, and the bad file is not kept.
    with pytest.raises(DownloadError, match=f"expected {'1' * 64} \\(listed by the index\\), got {sha(sdist)}"):
        run_download(params(tmp_path, {"name": "c", "index": "corpus==1.0", "members": "corpus-1.0/*.txt"}))
    assert not [p for p in (tmp_path / "cache").rglob("*.tar.gz")]


def test_members_glob_matching_nothing(server, tmp_path, monkeypatch):
    sdist = make_sdist(tmp_path, "corpus", "1.0", {"texts/a.txt": b"a\n"})
    server.add_project("corpus", {"corpus-1.0.tar.gz": sdist})
    monkeypatch.setenv("PIP_INDEX_URL", server.url + "/simple/")
    with pytest.raises(ChargenError, match=r"'corpus-1.0/plays/\*.txt' matches nothing"):
        run_download(params(tmp_path, {"name": "c", "index": "corpus==1.0", "sha256": sha(sdist),
                                       "members": "corpus-1.0/plays/*.txt"}))
    assert not (tmp_path / "raw").exists()


def test_pip_config_precedence_matches_pip(clean_env, tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = http://127.0.0.1:1/global\nproxy = http://127.0.0.1:2\n"
                    "[download]\nindex-url = http://127.0.0.1:1/download\n"
                    "extra-index-url = http://127.0.0.1:1/a\n  http://127.0.0.1:1/b\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    cfg = read_pip_config()
    assert cfg.index_url == "http://127.0.0.1:1/download"
    assert cfg.extra_index_urls == ("http://127.0.0.1:1/a", "http://127.0.0.1:1/b")
    assert cfg.proxy == "http://127.0.0.1:2"
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:1/env")
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "ca.pem"))
    cfg = read_pip_config()
    assert cfg.index_url == "http://127.0.0.1:1/env" and cfg.cert == str(tmp_path / "ca.pem")

    assert effective_settings("global.no-index='true'\n")["no-index"] == "true"
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_INDEX_URL")
    from pip._internal.models.index import PyPI
    assert read_pip_config().index_url == PyPI.simple_url  # pip's own default, not a literal here


def test_pick_distribution_prefers_the_pinned_file_then_the_sdist():
    files = [("tiny_corpus-1.0-py3-none-any.whl", "u1", "a" * 64),
             ("Tiny.Corpus-1.0.tar.gz", "u2", "b" * 64),
             ("tiny_corpus-1.0.1.tar.gz", "u3", "c" * 64),
             ("tiny_corpus-1.0rc1.tar.gz", "u4", "d" * 64)]
    assert pick_distribution(files, "TINY-corpus", "1.0", "i").url == "u2"
    assert pick_distribution(files, "tiny_corpus", "1.0", "i", pinned_sha256="a" * 64).kind == "wheel"
    assert pick_distribution(files, "tiny_corpus", "2.0", "i") is None


# --------------------------------------------------------------------------- text and local sources


def test_non_utf8_error_names_file_and_offset(clean_env, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ol\u00e9\n".encode("latin-1"))
    with pytest.raises(DownloadError, match=r"latin1.txt.*not valid UTF-8 at byte offset 3"):
        run_download(params(tmp_path, {"name": "l", "path": str(bad)}))
    # Offsets stay right when a multi-byte character straddles two chunks.
    with pytest.raises(DownloadError, match="doc is not valid UTF-8 at byte offset 6"):
        write_text([b"ab\xc3", b"\xa9cd\xff"], tmp_path / "out.txt", "doc")


def test_crlf_split_across_chunks(tmp_path):
    digest, n_bytes, n_chars = write_text([b"\xef\xbb\xbfa\r", b"\nb\r", b"c\r"], tmp_path / "o.txt", "d")
    assert (tmp_path / "o.txt").read_bytes() == b"a\nb\nc\n"
    assert (n_bytes, n_chars) == (6, 6)


def test_empty_corpus_is_an_error(clean_env, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DownloadError, match="corpus is empty"):
        run_download(params(tmp_path, {"name": "e", "path": str(tmp_path / "empty.txt")}))
    assert not (tmp_path / "raw").exists()


def test_source_validation():
    with pytest.raises(ParamsError, match="exactly one of index, url, path or arithmetic"):
        Source(name="x", url="http://127.0.0.1/a", path="a")
    with pytest.raises(ParamsError, match="name '../x'"):
        Source(name="../x", path="a")
    with pytest.raises(ParamsError, match="64 hex digits"):
        Source(name="x", path="a", sha256="abc")


def test_stage_script_on_a_local_corpus(clean_env, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "b" / "two.txt").write_text("Two.\n")
    (corpus / "one.txt").write_text("One.\n")
    (corpus / "skip.md").write_text("not text\n")
    (tmp_path / "single.txt").write_text("Single.\n")
    write_download_params(tmp_path, sources=[{"name": "dir", "path": "corpus"},
                                             {"name": "file", "path": "single.txt"}],
                          out_dir="out/raw", cache_dir="cache")
    run = run_stage_script("download", tmp_path)
    assert run.returncode == 0, run.stderr
    assert "3 documents" in run.stderr
    m = json.loads((tmp_path / "out" / "raw" / "manifest.json").read_text())
    assert [d["file"] for d in m["documents"]] == ["dir/b/two.txt", "dir/one.txt", "file/single.txt"]
    for d in m["documents"]:
        assert (tmp_path / "out" / "raw" / d["file"]).read_text() == {"dir/b/two.txt": "Two.\n",
                                                                    "dir/one.txt": "One.\n",
                                                                    "file/single.txt": "Single.\n"}[d["file"]]

    write_download_params(tmp_path, sources=[{"name": "gone", "path": "nowhere.txt"}], out_dir="out/raw")
    run = run_stage_script("download", tmp_path)
    assert run.returncode == 1
    assert run.stderr.startswith("error: download.sources[gone].path: nowhere.txt does not exist")
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert (tmp_path / "out" / "raw" / "manifest.json").exists()  # previous output kept


def test_https_trusts_pips_cert_and_trusted_host(clean_env, tmp_path, monkeypatch):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    data = b"over TLS\n"
    with LocalServer(certfile=str(cert), keyfile=str(key)) as srv:
        src = {"name": "s", "url": srv.add_file("/s.txt", data), "sha256": sha(data)}
        with pytest.raises(ChargenError, match=f"TLS certificate of 127.0.0.1:{srv.port} was not accepted.*PIP_CERT"):
            run_download(params(tmp_path, src))
        monkeypatch.setenv("PIP_CERT", str(cert))
        run_download(params(tmp_path, src))
        shutil.rmtree(tmp_path / "cache")
        monkeypatch.delenv("PIP_CERT")
        monkeypatch.setenv("PIP_TRUSTED_HOST", "127.0.0.1")
        run_download(params(tmp_path, src))
    assert (tmp_path / "raw" / "s" / "s.txt").read_bytes() == data


def test_resume_restarts_when_the_file_changed_meanwhile(server, tmp_path):
    old, new = b"old text\n" * 20_000, b"new text!\n" * 20_000
    server.add_file("/c.txt", old)
    server.cut_off("/c.txt", after_bytes=50_000)
    p = params(tmp_path, {"name": "c", "url": server.url + "/c.txt"})
    with pytest.raises(ChargenError, match="closed after 50000"):
        run_download(p)
    server.add_file("/c.txt", new)
    run_download(p)
    second = server.requests_for("/c.txt")[1]
    assert second.headers["Range"] == "bytes=50000-" and second.headers["If-Range"]
    assert (tmp_path / "raw" / "c" / "c.txt").read_bytes() == new


def test_dvc_repro_runs_the_download_stage(clean_env, tmp_path):
    bindir = Path(sys.executable).parent
    if not (bindir / "dvc").exists():
        pytest.skip("dvc is not installed next to this interpreter")
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    for name in ("chargen", "pipeline", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("A small corpus.\n")
    write_download_params(tmp_path, sources=[{"name": "local", "path": "corpus"}])
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(tmp_path)}

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / "dvc"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    first = dvc("repro", "download")
    assert first.returncode == 0, first.stderr + first.stdout
    m = json.loads((tmp_path / "data" / "raw" / "manifest.json").read_text())
    assert [d["file"] for d in m["documents"]] == ["local/a.txt"]
    again = dvc("repro", "download")
    assert "didn't change" in again.stdout + again.stderr


def test_remote_file_name_cannot_escape_the_cache(server, tmp_path):
    data = b"harmless\n"
    server.add_file("/files/../../evil.txt", data)
    run_download(params(tmp_path, {"name": "t", "url": server.url + "/files/..%2F..%2Fevil.txt",
                                   "sha256": sha(data)}))
    assert [d["file"] for d in manifest(tmp_path)["documents"]] == ["t/.._.._evil.txt"]
    assert not list(tmp_path.rglob("evil.txt"))


def test_default_corpus_is_pinned():
    from pipeline.params import load_params

    sources = load_params(ROOT / "params.yaml").download.sources
    assert sources and all(s.sha256 for s in sources if s.index or s.url)
