"""Start-up of the ``chargen`` command: process start -> first generated character, and
what the imports and the model load cost on their own. Standard library only, so that it
runs in a virtual environment holding nothing but the chargen wheel (the development
environment's many packages slow Python's start-up). Prints one JSON object.

    python -m venv /tmp/start && /tmp/start/bin/pip install dist/chargen-*.whl
    /tmp/start/bin/python benchmarks/startup.py --model models/model.int8.onnx
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path


def first_byte_s(cmd: list[str], repeats: int) -> float:
    """Median seconds from spawning ``cmd`` to the first byte on its stdout (one warm-up run)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout is not None
        p.stdout.read(1)
        if i:
            times.append(time.perf_counter() - t0)
        p.stdout.close()
        p.wait()
    return statistics.median(times)


def python_s(code: str, repeats: int) -> float:
    """Start-up of this interpreter running ``code``, then writing one byte."""
    return first_byte_s([sys.executable, "-c", f"{code}\nimport sys; sys.stdout.write('x')"], repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=Path("models/model.int8.onnx"))
    ap.add_argument("--repeats", type=int, default=9, help="timed runs of each command (median kept)")
    a = ap.parse_args()
    # Checked here, not with benchmarks/options.py: this file runs alone, as a script, in a
    # virtual environment holding only the chargen wheel.
    if a.repeats < 1:
        ap.error(f"argument --repeats: must be at least 1, got {a.repeats}")
    if not a.model.is_file():
        sys.exit(f"error: {a.model} is not a model file; run `dvc repro` first or pass --model")
    r, model = a.repeats, str(a.model)
    chargen = str(Path(sys.executable).with_name("chargen"))
    load = ("import onnxruntime as ort; so = ort.SessionOptions(); so.log_severity_level = 3; "
            f"ort.InferenceSession({model!r}, so, providers=['CPUExecutionProvider'])")
    seconds = {
        "python": python_s("pass", r),
        "import_typer": python_s("import typer", r),
        "import_numpy_onnxruntime": python_s("import numpy, onnxruntime", r),
        "import_and_load_model": python_s(load, r),
        "chargen_help": first_byte_s([chargen, "--help"], r),
        "chargen_generate_first_char": first_byte_s(
            [chargen, "generate", "Once", "-n", "1", "--seed", "0", "--no-stop-at-eot", "--model", model], r),
    }
    versions = {p: metadata.version(p) for p in ("typer", "numpy", "onnxruntime")}
    installed = sorted(d.metadata["Name"] for d in metadata.distributions())
    print(json.dumps({"seconds_median": {k: round(v, 4) for k, v in seconds.items()}, "repeats": r,
                      "versions": versions, "installed": installed}, indent=1))


if __name__ == "__main__":
    main()
