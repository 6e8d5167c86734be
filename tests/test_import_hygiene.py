"""The inference path imports only the standard library, numpy, onnxruntime and typer.

Two checks: running every CLI command in a fresh interpreter leaves no torch, dvc,
onnx or yaml in ``sys.modules``; and a scan of the inference modules' source finds
no import (even a lazy one inside a function) of anything else.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pipeline

PIPELINE_DIR = Path(pipeline.__file__).parent
INFERENCE_MODULES = ["cli", "runtime", "sampling", "vocab", "scoring", "spelling", "batches", "errors"]
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "typer"}
FORBIDDEN = ("torch", "dvc", "dvclive", "onnx", "onnxscript", "yaml")

# Runs in a fresh interpreter: every command in-process, then lists forbidden modules.
PROBE = """
import json, sys
from pipeline.cli import app
for args in ARGS:
    try:
        app(args, standalone_mode=False)
    except SystemExit:
        pass
forbidden = FORBIDDEN
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({"forbidden": loaded, "ran_onnxruntime": "onnxruntime" in sys.modules}))
"""


def test_running_every_command_imports_no_heavy_package(tiny_models, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(tiny_models.text[:200], encoding="utf-8")
    model = str(tiny_models.int8)
    commands = [
        ["generate", "the cat", "-n", "20", "--seed", "1", "--model", model],
        ["generate", "the", "-n", "5", "-k", "2", "--model", model],
        ["eval", str(text), "--model", model],
        ["info", "--model", model, "--json"],
        ["bench", "--int8", model, "--fp32", str(tiny_models.fp32), "--chars", "5", "--repeats", "1"],
    ]
    probe = PROBE.replace("ARGS", repr(commands)).replace("FORBIDDEN", repr(FORBIDDEN))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["ran_onnxruntime"]  # the commands really ran a model
    assert report["forbidden"] == [], f"the inference path imported {report['forbidden']}"


def test_inference_modules_import_nothing_else() -> None:
    allowed = ALLOWED_THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__"}
    inference = {f"pipeline.{m}" for m in INFERENCE_MODULES}
    bad: list[str] = []
    for name in INFERENCE_MODULES:
        path = PIPELINE_DIR / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                ok = target in inference if top == "pipeline" else top in allowed
                if not ok:
                    bad.append(f"pipeline/{name}.py:{node.lineno} imports {target}")
    assert bad == []
