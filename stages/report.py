"""DVC stage `report`: metrics/<precision>.json and the training curves -> metrics/compare.json,
the side-by-side plot's rows and the charts (SVG and PNG) under reports/charts/."""

from __future__ import annotations

import argparse

from chargen.contract import PRECISIONS
from pipeline.charts.curves import curves_dir, read_curves
from pipeline.charts.page import write_charts
from pipeline.charts.specs import comparison_chart, curve_charts
from pipeline.evaluation.report import metrics_path, read_metrics, report
from pipeline.files import write_json
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    measured = {p: read_metrics(metrics_path(params.compare.out_dir, p)) for p in PRECISIONS}
    curves = read_curves(curves_dir(params.train.live_dir))
    summary, rows = report(measured)
    charts = [*curve_charts(curves), comparison_chart(rows, PRECISIONS)]
    # The charts first: rendering is what can fail, and then no output has changed.
    write_charts(params.report.charts, charts, params.report.png_scale)
    write_json(params.report.out, summary)
    write_json(params.report.plot, rows)
    base = PRECISIONS[0]
    for p in PRECISIONS[1:]:
        diff, ratio = summary[f"{p}_minus_{base}"], summary[f"{p}_over_{base}"]
        print(
            f"{p} vs {base}: test loss {diff['test_loss']:+.4f} nats/char, size {ratio['size_bytes']:.0%}, "
            f"speed {ratio['chars_per_s']:.2f}x -> {params.report.out}"
        )
    print(f"{len(charts)} charts -> {params.report.charts}/")


if __name__ == "__main__":
    run_stage(main)
