"""Compare and report: both metrics files written by the real stage scripts, measured
with ONNX Runtime on the same data; the report holds int8 - fp32 and the plot rows."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import run_stage_script

from chargen.scoring import score_batches
from pipeline.evaluation.report import REPORTED
from pipeline.tokens.splits import read_split

KEYS = ("test_loss", "test_bpc", "spelling_rate", "size_bytes", "chars_per_s", "first_char_s", "peak_rss_mb")


@pytest.fixture(scope="module")
def compared(tiny_project, tiny_models, tmp_path_factory):
    """A project after `compare@fp32`, `compare@int8` and `report` ran in it."""
    project = tmp_path_factory.mktemp("compare") / "project"
    shutil.copytree(tiny_project, project)
    (project / "models").mkdir()
    shutil.copy(tiny_models.fp32, project / "models" / "model.fp32.onnx")
    shutil.copy(tiny_models.int8, project / "models" / "model.int8.onnx")
    for precision in ("fp32", "int8"):
        done = run_stage_script("compare", project, "--precision", precision, "--params", "params.yaml")
        assert done.returncode == 0, done.stderr
    done = run_stage_script("report", project)
    assert done.returncode == 0, done.stderr
    return project


def load(project, name):
    return json.loads((project / "metrics" / name).read_text(encoding="utf-8"))


def test_both_metrics_files_hold_every_measurement(compared):
    for precision in ("fp32", "int8"):
        m = load(compared, f"{precision}.json")
        assert m["precision"] == precision
        assert all(isinstance(m[k], int | float) and math.isfinite(m[k]) for k in KEYS)
        assert m["test_bpc"] == pytest.approx(m["test_loss"] / math.log(2))
        assert m["size_bytes"] == (compared / "models" / f"model.{precision}.onnx").stat().st_size
        assert 0 < m["spelling_rate"] <= 1 and 0 <= m["spelling_rate_4plus"] <= 1
        assert m["chars_per_s"] > 0 and m["first_char_s"] > 0 and m["peak_rss_mb"] > 10
    fp32, int8 = load(compared, "fp32.json"), load(compared, "int8.json")
    assert fp32["test_tokens"] == int8["test_tokens"]  # same data for both
    assert int8["size_bytes"] < fp32["size_bytes"]


def test_fp32_test_loss_equals_pytorch_on_the_same_windows(compared, tiny_models):
    ids = read_split(compared / "data" / "encoded", "test")
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y, mask in score_batches(ids, tiny_models.model.cfg.block_size, 16):
            logits, _ = tiny_models.model(torch.from_numpy(x))
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(y), reduction="none")
            total += nll[torch.from_numpy(mask)].double().sum().item()
            n += int(mask.sum())
    fp32 = load(compared, "fp32.json")
    assert fp32["test_tokens"] == n
    assert fp32["test_loss"] == pytest.approx(total / n, abs=1e-5)


def test_report_holds_differences_and_plot_rows(compared):
    fp32, int8 = load(compared, "fp32.json"), load(compared, "int8.json")
    summary = load(compared, "compare.json")
    for key in REPORTED:
        assert summary["int8_minus_fp32"][key] == pytest.approx(int8[key] - fp32[key])
    assert summary["int8_over_fp32"]["size_bytes"] == pytest.approx(int8["size_bytes"] / fp32["size_bytes"])
    rows = load(compared, "compare_plot.json")
    assert {r["precision"] for r in rows} == {"fp32", "int8"}
    assert all(r["relative_to_fp32"] == pytest.approx(1.0) for r in rows if r["precision"] == "fp32")
    speed = {r["precision"]: r["value"] for r in rows if r["metric"].startswith("generation chars/s")}
    assert speed == {"fp32": fp32["chars_per_s"], "int8": int8["chars_per_s"]}
    assert np.isclose(sum(1 for r in rows if r["precision"] == "int8"), len(rows) / 2)


def test_compare_refuses_a_model_of_the_other_precision(compared, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(compared, project)
    shutil.copy(project / "models" / "model.fp32.onnx", project / "models" / "model.int8.onnx")
    before = (project / "metrics" / "int8.json").read_bytes()
    done = run_stage_script("compare", project, "--precision", "int8")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "not int8" in done.stderr and done.stderr.count("\n") == 1
    assert (project / "metrics" / "int8.json").read_bytes() == before  # untouched


def test_report_without_int8_metrics_fails_cleanly(compared, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(compared, project)
    (project / "metrics" / "int8.json").unlink()
    (project / "metrics" / "compare.json").unlink()
    done = run_stage_script("report", project)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "int8.json: not found" in done.stderr
    assert not (project / "metrics" / "compare.json").exists()
