"""Plots beyond the report stage: dvc.yaml declares every curve dvclive logs, the curves
reader refuses bad files in one line, and `dvc plots show` can make pages that need no network."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvcproject import dvc, dvc_env, make_dvc_project

from chargen.errors import ChargenError
from pipeline.charts.curves import curves_dir, read_curves

REPO = Path(__file__).resolve().parents[1]


def top_level_plot_files() -> set[str]:
    """Every file the top-level `plots` of dvc.yaml draws, its ${...} resolved."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

    def resolve(text: str) -> str:
        def value(m: re.Match) -> str:
            node = params
            for part in m.group(1).split("."):
                node = node[part]
            return str(node)

        return re.sub(r"\$\{\s*([\w.]+)\s*\}", value, text)

    files = set()
    for entry in yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["plots"]:
        (plot_id, props), = entry.items()
        ys = (props or {}).get("y")
        files |= {resolve(f) for f in ys} if isinstance(ys, dict) else {resolve(plot_id)}
    return files


def test_dvc_yaml_plots_every_curve_of_the_committed_run() -> None:
    live = curves_dir(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["train"]["live_dir"])
    logged = {p.relative_to(REPO).as_posix() for p in (REPO / live).rglob("*.tsv")}
    drawn = {f for f in top_level_plot_files() if f.startswith(f"{live.as_posix()}/")}  # not the search's plots
    assert logged and logged == drawn


def test_curves_are_grouped_by_quantity_and_bad_rows_are_refused(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "loss.tsv").write_text("step\tloss\n0\t3.5\n20\t2.0\n", encoding="utf-8")
    (tmp_path / "lr.tsv").write_text("step\tlr\n10\t0.001\n", encoding="utf-8")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loss.tsv").write_text("step\tloss\n10\t3.0\n20\tnan\n", encoding="utf-8")
    curves = read_curves(tmp_path)
    assert list(curves) == ["loss", "lr"]
    assert [(c.series, c.steps, c.values) for c in curves["loss"]] == [
        ("train", (10,), (3.0,)), ("val", (0, 20), (3.5, 2.0))]  # a non-finite value is not drawn
    (tmp_path / "lr.tsv").write_text("step\tlr\n10\tfast\n", encoding="utf-8")
    with pytest.raises(ChargenError, match=r"lr.tsv:2: expected a step and a lr value; run the train stage"):
        read_curves(tmp_path)
    with pytest.raises(ChargenError, match="no training curves found"):
        read_curves(tmp_path / "absent")


def test_offline_template_gives_dvc_plots_pages_without_network_scripts(tmp_path: Path) -> None:
    repo = make_dvc_project(tmp_path / "project", {"a.txt": "text\n"})
    shutil.copytree(REPO / "dvclive", repo / "dvclive")
    (repo / "metrics").mkdir()
    shutil.copy(REPO / "metrics" / "compare_plot.json", repo / "metrics" / "compare_plot.json")
    done = subprocess.run([sys.executable, "-m", "pipeline.charts.offline_template"], cwd=repo,
                          env=dvc_env(repo), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    dvc(repo, "config", "--local", "plots.html_template", "plots/offline.html")
    dvc(repo, "plots", "show", "-o", "out")
    page = (repo / "out" / "index.html").read_text(encoding="utf-8")
    assert "<script src" not in page and "vegaEmbed" in page  # the libraries are in the page itself
    charts = re.findall(r"vegaEmbed\('#(\w+)'", page)
    # every top-level plot of the training run (loss and bpc, train and validation on one chart
    # each; lr, tokens/s, chars/s, time), then the comparison; the search's when it has run
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    run_plots = [p for p in declared if not next(iter(p)).startswith("tuning/")]
    assert len([c for c in charts if not c.startswith("tuning_")]) == len(run_plots) + 1 == 7
    loss = json.loads(dvc(repo, "plots", "show", "--json", "loss"))["data"]["loss"][0]["content"]
    assert {row["filename"] for row in loss["data"]["values"]} == {"train/loss.tsv", "val/loss.tsv"}
