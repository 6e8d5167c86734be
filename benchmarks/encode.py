"""Encode-stage throughput and peak memory on a synthetic corpus; prints one JSON object.

    python -m benchmarks.encode --size-mb 1000

Writes a multi-document corpus with some non-ASCII text (and a manifest, as the
download stage would) to a temporary directory, runs the real encode stage
on it in a child process, and reports the child's wall time, CPU time and peak
RSS (VmHWM). MB here means MiB (2**20 bytes). The corpus is flushed to disk
first but still read from the page cache, as it is right after the download
stage wrote it. The temporary directory is deleted afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.options import positive_int, require_dir
from pipeline.stage import run_stage

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20
WORDS = (
    "the and of to a in that is was he for it with as his on be at by i this had not are "
    "but from or have an they which one you were her all she there would their we him been "
    "has when who will more no if out so said what up its about into than them can only "
    "other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good "
    # some non-ASCII: accents, ligatures, dashes, quotes, Greek, CJK and an emoji
    "café naïve façade rôle Straße über coöperate — – “quoted” ‘single’ … αβγ λόγος "
    "東京 中文 😀 €100 ½"
).split()


def make_text(rng: np.random.Generator, n_words: int) -> str:
    """Random words in lines of 4-16 words, a blank line now and then."""
    words = np.array(WORDS, dtype=object)[rng.integers(0, len(WORDS), size=n_words)]
    line_ends = np.cumsum(rng.integers(4, 17, size=n_words // 4 + 1))
    line_ends = line_ends[line_ends < n_words]
    seps = np.full(n_words, " ", dtype=object)
    seps[line_ends] = "\n"
    seps[line_ends[::7]] = ".\n\n"
    return "".join((words + seps).tolist())


def write_corpus(raw: Path, size_mb: int, n_docs: int, seed: int) -> int:
    """``n_docs`` documents totalling about ``size_mb`` MiB; returns the bytes written."""
    rng = np.random.default_rng(seed)
    block = make_text(rng, 1_500_000).encode("utf-8")  # ~8 MiB of distinct text
    per_doc = size_mb * MB // n_docs
    docs, total = [], 0
    for i in range(n_docs):
        path = raw / f"doc{i:04d}.txt"
        h = hashlib.sha256()
        written = 0
        with open(path, "wb") as f:
            while written < per_doc:
                # A rotated copy of the block, cut at a line end, so documents differ.
                start = block.find(b"\n", int(rng.integers(0, len(block) // 2))) + 1
                piece = block[start : start + min(len(block) - start, per_doc - written)]
                piece = piece[: piece.rfind(b"\n") + 1]  # whole lines: valid UTF-8
                if not piece:
                    break
                f.write(piece)
                h.update(piece)
                written += len(piece)
        docs.append({"name": path.stem, "file": path.name, "source": "synthetic",
                     "sha256": h.hexdigest(), "bytes": written})
        total += written
    (raw / "manifest.json").write_text(json.dumps({"documents": docs}), encoding="utf-8")
    return total


# Runs the stage script as __main__ and then records the process's own peak RSS.
# VmHWM, not ru_maxrss: after fork + exec, ru_maxrss also counts the parent's
# peak (Linux carries it over exec), which here includes generating the corpus.
_CHILD = """
import runpy, sys
try:
    runpy.run_module(sys.argv[1], run_name="__main__", alter_sys=True)
finally:
    status = open("/proc/self/status").read()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    open(sys.argv[2], "w").write(kb)
"""


def run_encode(workdir: Path) -> tuple[float, float, float, float, str]:
    """Run the stage; (wall s, user CPU s, system CPU s, peak RSS MiB, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out, err, hwm = workdir / "stdout.txt", workdir / "stderr.txt", workdir / "vmhwm.txt"
    cmd = [sys.executable, "-c", _CHILD, "stages.encode", str(hwm)]
    with open(out, "w") as fo, open(err, "w") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=fo, stderr=fe)
        # wait4 instead of proc.wait(): it also returns the child's CPU time.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"encode failed ({proc.returncode}): {err.read_text().strip()}")
    rss = int(hwm.read_text()) / 1024
    return wall, usage.ru_utime, usage.ru_stime, rss, out.read_text().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=positive_int, default=100, help="corpus size in MiB (default 100)")
    ap.add_argument("--docs", type=positive_int, default=20, help="number of documents (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="an existing folder to make the temporary corpus in")
    args = ap.parse_args()
    if args.dir is not None:
        require_dir(args.dir, "--dir")

    with tempfile.TemporaryDirectory(prefix="chargen-encode-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        raw = work / "raw"
        raw.mkdir()
        nbytes = write_corpus(raw, args.size_mb, args.docs, args.seed)
        os.sync()  # flush the corpus now, not while the encode is being timed
        params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        params["download"].update(sources=[{"name": "synthetic", "path": "raw"}], out_dir="raw")
        params["encode"]["out_dir"] = "encoded"
        (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        wall, user, system, rss, summary = run_encode(work)
        cpu = user + system
        meta = json.loads((work / "encoded" / "meta.json").read_text(encoding="utf-8"))
    print(json.dumps({
        "benchmark": "encode",
        "size_mb": round(nbytes / MB, 1),
        "documents": args.docs,
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "user_seconds": round(user, 2),
        "sys_seconds": round(system, 2),
        "mb_per_s": round(nbytes / MB / wall, 1),
        "mb_per_cpu_s": round(nbytes / MB / cpu, 1),
        "peak_rss_mb": round(rss, 1),
        "vocab_size": meta["vocab_size"],
        "tokens": sum(meta["splits"].values()),
        "loadavg": os.getloadavg()[0],
        "summary": summary,
    }))


if __name__ == "__main__":
    run_stage(main)
