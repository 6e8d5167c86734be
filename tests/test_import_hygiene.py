"""The runtime package imports only the standard library, numpy, onnxruntime and typer.

Two checks: running every CLI command in a fresh interpreter leaves no torch, dvc,
onnx, yaml or pipeline module in ``sys.modules``; and a scan of every module of
``chargen`` finds no import (even a lazy one inside a function) of anything else.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import chargen

RUNTIME_DIR = Path(chargen.__file__).parent
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "typer"}
FORBIDDEN = ("torch", "dvc", "dvclive", "onnx", "onnxscript", "yaml", "pipeline", "tokenizers")

# Runs in a fresh interpreter: every command in-process, then lists forbidden modules.
PROBE = """
import json, sys
from chargen.cli import app
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
        ["generate", "the", "-n", "5", "--num-samples", "2", "--model", model],
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


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_runtime_modules_import_nothing_else() -> None:
    allowed = ALLOWED_THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__", "chargen"}
    bad = [
        f"{path.relative_to(RUNTIME_DIR.parent)}:{line} imports {module}"
        for path in sorted(RUNTIME_DIR.rglob("*.py"))
        for line, module in runtime_imports(path)
        if module.split(".")[0] not in allowed
    ]
    assert bad == []
