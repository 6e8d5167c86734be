"""The benchmark scripts run end to end on tiny inputs and print what they promise.

Only their plumbing is checked here; the numbers they print are measurements,
which belong in the README, not in assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import ROOT_PARAMS, stage_env, write_encoded


def run_benchmark(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300, check=False,
    )


def test_quantize_benchmark_measures_every_choice_and_width(tiny_models, tmp_path):
    write_encoded(tmp_path / "encoded", tiny_models.tokenizer)
    done = run_benchmark(
        "quantize", "--model", str(tiny_models.fp32), "--encoded", str(tmp_path / "encoded"),
        "--params", str(ROOT_PARAMS),
        "--widths", "32", "64", "--context", "40", "--chars", "20", "--repeats", "1", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    choices = result["choices"]
    assert set(choices) == {"fp32", "matmul_only", "matmul_and_gather", "per_channel", "no_reduce_range"}
    assert choices["fp32"]["size_frac_of_fp32"] == 1.0 and choices["fp32"]["speed_over_fp32"] == 1.0
    for name, m in choices.items():
        assert math.isfinite(m["test_loss"]) and m["chars_per_s"] > 0, name
        assert name == "fp32" or m["size_frac_of_fp32"] < 1.0
    # Quantizing the embedding and the n-gram tables as well can only shrink the file further.
    assert choices["matmul_and_gather"]["size_frac_of_fp32"] < choices["matmul_only"]["size_frac_of_fp32"]
    assert set(result["widths"]) == {"32", "64"}
    for w in result["widths"].values():
        assert w["int8_over_fp32"] == w["int8_chars_per_s"] / w["fp32_chars_per_s"]


def test_quantize_benchmark_names_a_missing_model(tmp_path):
    done = run_benchmark("quantize", "--model", str(tmp_path / "none.onnx"), cwd=tmp_path)
    assert done.returncode == 2
    assert "none.onnx does not exist; run `dvc repro` first" in done.stderr
    assert "Traceback" not in done.stderr
