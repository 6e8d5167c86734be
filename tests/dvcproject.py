"""A throwaway copy of the project under real git and real DVC, fed by a local corpus.

Shared by the tests that run `dvc repro`: the copy's own chargen/ and pipeline/ are imported
(PYTHONPATH), the venv's dvc is on PATH, and the download stage reads a `path:`
source, so nothing touches the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dvc_env(repo: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1"}


def dvc(repo: Path, *args: str) -> str:
    """Run dvc in ``repo``; fail the test with its output unless it succeeds."""
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=dvc_env(repo), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def make_dvc_project(
    root: Path,
    docs: Mapping[str, str],
    edit_params: Callable[[dict], None] = lambda params: None,
    commit: bool = False,
) -> Path:
    """Copy chargen/, pipeline/, stages/, base/, dvc.yaml and params.yaml (download from ``corpus/`` holding
    ``docs``, then ``edit_params``) into ``root``; git init and dvc init it."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root.mkdir()
    for name in ("chargen", "pipeline", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # The folder of base checkpoints (its README and .gitignore only): encode, train and evaluate depend on it.
    shutil.copytree(REPO / "base", root / "base", ignore=shutil.ignore_patterns("*.pt"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["download"]["sources"] = [{"name": "local", "path": "corpus"}]
    edit_params(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (root / "corpus").mkdir()
    for name, text in docs.items():
        (root / "corpus" / name).write_text(text, encoding="utf-8")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    if commit:  # dvclive needs a commit to name the run's revision
        subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"],
                       cwd=root, check=True)
    return root
