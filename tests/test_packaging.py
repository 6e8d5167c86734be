"""The wheel: one import package, `chargen`, whose modules need only numpy, onnxruntime and
typer, and which generates text installed on its own, with the training stack unimportable."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_DEPS = {"numpy", "onnxruntime", "typer"}
# Importing any of these fails in the probe below, as on a machine that never installed them.
BLOCKED = ("torch", "dvc", "dvclive", "onnx", "onnxscript", "yaml", "pipeline", "stages", "tokenizers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("chargen-*.whl")
    return path


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"chargen"}
    assert "chargen/contract.py" in names and "chargen/tokenizers/char.py" in names
    assert not any(n.startswith(("pipeline/", "stages/", "tests/", "benchmarks/")) for n in names)


def test_the_wheel_needs_only_the_runtime_dependencies(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        (meta_name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(z.read(meta_name).decode())
        required = {re.split(r"[<>=!~;\s]", r, maxsplit=1)[0].lower()
                    for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
        assert required == RUNTIME_DEPS
        allowed = RUNTIME_DEPS | set(sys.stdlib_module_names) | {"__future__", "chargen"}
        for name in z.namelist():
            if not name.endswith(".py"):
                continue
            for node in ast.walk(ast.parse(z.read(name).decode())):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                           [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                assert all(m.split(".")[0] in allowed for m in modules if m), f"{name} imports {modules}"


PROBE = """
import sys
for name in BLOCKED:
    sys.modules[name] = None  # `import name` now raises ImportError
import chargen
assert chargen.__file__.startswith(sys.argv[1]), chargen.__file__
from chargen.cli import main
sys.argv = ["chargen", "generate", "the", "-n", "30", "--seed", "1", "--no-stop-at-eot", "--model", sys.argv[2]]
main()
"""


def test_the_installed_wheel_generates_without_the_training_stack(wheel: Path, tiny_models, tmp_path: Path) -> None:
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    probe = PROBE.replace("BLOCKED", repr(BLOCKED))
    run = subprocess.run([sys.executable, "-c", probe, str(target), str(tiny_models.int8)],
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout) == 30 and set(run.stdout) <= set(tiny_models.tokenizer.tokens[2:])
    assert (target / "bin" / "chargen").exists()  # the console script
