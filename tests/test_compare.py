"""Compare and report: every precision's metrics file written by the real stage scripts,
measured with ONNX Runtime on the same data; the report holds int8 - fp32 and int4 - fp32,
the plot rows and the charts (SVG and PNG, drawn offline, the same bytes every time)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from conftest import run_stage_script, stage_env

from chargen.contract import PRECISIONS
from chargen.scoring import score_batches
from pipeline.evaluation.report import PLOTTED, REPORTED
from pipeline.tokens.splits import read_split

# The curves the fixture logs, as the train stage logs them: (step, value) per metric.
TRAIN_STEPS = range(5, 45, 5)
CURVES = {
    "train/loss": [(s, 3.0 - s / 20) for s in TRAIN_STEPS],
    "val/loss": [(0, 3.5), (20, 2.2), (40, 1.6)],
    "lr": [(s, 1e-3 * min(1, s / 10)) for s in TRAIN_STEPS],
    "tokens_per_s": [(s, 1000.0 + s) for s in TRAIN_STEPS],
}
KEYS = ("test_loss", "test_bpc", "spelling_rate", "size_bytes", "chars_per_s", "first_char_s", "peak_rss_mb")


@pytest.fixture(scope="module")
def compared(tiny_project, tiny_models, tmp_path_factory):
    """A project after `compare@<precision>` for every precision and `report` ran in it."""
    project = tmp_path_factory.mktemp("compare") / "project"
    shutil.copytree(tiny_project, project)
    (project / "models").mkdir()
    for precision in PRECISIONS:
        shutil.copy(getattr(tiny_models, precision), project / "models" / f"model.{precision}.onnx")
    for precision in PRECISIONS:
        done = run_stage_script("compare", project, "--precision", precision, "--params", "params.yaml")
        assert done.returncode == 0, done.stderr
    log_curves(project / "dvclive")
    done = run_stage_script("report", project)
    assert done.returncode == 0, done.stderr
    return project


def log_curves(live_dir):
    """dvclive's files, written by the train stage's own logger."""
    from pipeline.training.train import Curves

    curves = Curves(live_dir, None)
    for step in sorted({s for points in CURVES.values() for s, _ in points}):
        curves.log(step, {name: dict(points)[step] for name, points in CURVES.items() if step in dict(points)})
    curves.close()


def load(project, name):
    return json.loads((project / "metrics" / name).read_text(encoding="utf-8"))


def test_every_metrics_file_holds_every_measurement(compared):
    for precision in PRECISIONS:
        m = load(compared, f"{precision}.json")
        assert m["precision"] == precision
        assert all(isinstance(m[k], int | float) and math.isfinite(m[k]) for k in KEYS)
        assert m["test_bpc"] == pytest.approx(m["test_loss"] / math.log(2))
        assert m["size_bytes"] == (compared / "models" / f"model.{precision}.onnx").stat().st_size
        assert 0 < m["spelling_rate"] <= 1 and 0 <= m["spelling_rate_4plus"] <= 1
        assert m["chars_per_s"] > 0 and m["first_char_s"] > 0 and m["peak_rss_mb"] > 10
    fp32, int8, int4 = (load(compared, f"{p}.json") for p in ("fp32", "int8", "int4"))
    assert fp32["test_tokens"] == int8["test_tokens"] == int4["test_tokens"]  # same data for all
    assert int4["size_bytes"] < int8["size_bytes"] < fp32["size_bytes"]


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
    measured = {p: load(compared, f"{p}.json") for p in PRECISIONS}
    fp32 = measured["fp32"]
    summary = load(compared, "compare.json")
    assert sorted(summary) == sorted(f"{p}_{how}_fp32" for p in ("int8", "int4") for how in ("minus", "over"))
    for p in ("int8", "int4"):
        for key in REPORTED:
            assert summary[f"{p}_minus_fp32"][key] == pytest.approx(measured[p][key] - fp32[key])
        assert summary[f"{p}_over_fp32"]["size_bytes"] == pytest.approx(measured[p]["size_bytes"] / fp32["size_bytes"])
    rows = load(compared, "compare_plot.json")
    assert {r["precision"] for r in rows} == set(PRECISIONS)
    assert all(r["relative_to_fp32"] == pytest.approx(1.0) for r in rows if r["precision"] == "fp32")
    speed = {r["precision"]: r["value"] for r in rows if r["metric"].startswith("generation chars/s")}
    assert speed == {p: m["chars_per_s"] for p, m in measured.items()}
    assert np.isclose(sum(1 for r in rows if r["precision"] == "int4"), len(rows) / len(PRECISIONS))


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


# ----------------------------------------------------------------------------- charts


def line_paths(svg_file):
    """{series: number of points} of every line in a chart, from the SVG's path data."""
    root = ET.parse(svg_file).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    lines = {}
    for el in root.iter("{http://www.w3.org/2000/svg}path"):
        if el.get("aria-roledescription") == "line mark":
            series = re.search(r"series: (\S+)$", el.get("aria-label")).group(1)
            lines[series] = len(re.findall(r"[ML]", el.get("d")))
    return lines


def test_report_draws_every_curve_and_every_precision(compared):
    charts = compared / "reports" / "charts"
    assert line_paths(charts / "loss.svg") == {"train": len(TRAIN_STEPS), "val": 3}  # one chart, both
    assert line_paths(charts / "lr.svg") == {"lr": len(TRAIN_STEPS)}
    assert line_paths(charts / "tokens_per_s.svg") == {"tokens_per_s": len(TRAIN_STEPS)}
    compare = ET.parse(charts / "compare.svg").getroot()
    bars = [el for el in compare.iter() if el.get("aria-roledescription") == "bar"]
    drawn = [k for k in PLOTTED if not k.startswith("arithmetic_")]  # no equations in this corpus
    assert len(bars) == len(drawn) * len(PRECISIONS)
    page = (charts / "README.md").read_text(encoding="utf-8")
    names = sorted(p.stem for p in charts.glob("*.svg"))
    assert names == ["compare", "loss", "lr", "tokens_per_s"]
    for name in names:
        assert f"]({name}.svg)" in page and f"]({name}.png)" in page
        png = (charts / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        svg_width = float(ET.parse(charts / f"{name}.svg").getroot().get("width"))
        assert int.from_bytes(png[16:20], "big") == 2 * svg_width  # params.yaml: png_scale 2


def test_charts_render_without_network_and_to_the_same_bytes(compared, tmp_path):
    """The report stage again, in a network namespace with no interface up: nothing can be
    fetched, and the same inputs give byte-identical SVG and PNG files."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    project = tmp_path / "project"
    shutil.copytree(compared, project)
    shutil.rmtree(project / "reports" / "charts")
    offline = ["unshare", "--net", "--map-root-user"]
    connect = "import socket; socket.create_connection(('127.0.0.1', 9), 1)"
    probe = subprocess.run([*offline, sys.executable, "-c", connect], capture_output=True, text=True, check=False)
    if probe.stderr.startswith("unshare:"):
        pytest.skip(f"no network namespace here: {probe.stderr.strip()}")
    assert probe.returncode != 0 and "unreachable" in probe.stderr  # even localhost is out of reach
    done = subprocess.run([*offline, sys.executable, "-m", "stages.report"], cwd=project, env=stage_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    before = sorted((compared / "reports" / "charts").iterdir())
    after = sorted((project / "reports" / "charts").iterdir())
    assert [p.name for p in after] == [p.name for p in before]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(after, before, strict=True))


def test_report_without_training_curves_fails_cleanly(compared, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(compared, project)
    shutil.rmtree(project / "dvclive")
    shutil.rmtree(project / "reports")
    (project / "metrics" / "compare.json").unlink()
    done = run_stage_script("report", project)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "no training curves" in done.stderr and "dvc repro" in done.stderr
    assert not (project / "reports").exists() and not (project / "metrics" / "compare.json").exists()
