"""DVC stage `report`: metrics/<precision>.json -> metrics/compare.json and the side-by-side plot."""

from __future__ import annotations

import argparse

from chargen.contract import PRECISIONS
from pipeline.evaluation.report import metrics_path, read_metrics, report
from pipeline.files import write_json
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    measured = {p: read_metrics(metrics_path(params.compare.out_dir, p)) for p in PRECISIONS}
    summary, rows = report(measured)
    write_json(params.report.out, summary)
    write_json(params.report.plot, rows)
    base = PRECISIONS[0]
    for p in PRECISIONS[1:]:
        diff, ratio = summary[f"{p}_minus_{base}"], summary[f"{p}_over_{base}"]
        print(
            f"{p} vs {base}: test loss {diff['test_loss']:+.4f} nats/char, size {ratio['size_bytes']:.0%}, "
            f"speed {ratio['chars_per_s']:.2f}x -> {params.report.out}"
        )


if __name__ == "__main__":
    run_stage(main)
