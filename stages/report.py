"""DVC stage `report`: metrics/{fp32,int8}.json -> metrics/compare.json and the side-by-side plot."""

from __future__ import annotations

import argparse

from pipeline.atomic import write_json
from pipeline.compare import read_metrics, report
from pipeline.stage import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--metrics-dir", default="metrics", help="where fp32.json and int8.json are")
    args = ap.parse_args()
    d = args.metrics_dir
    summary, rows = report(read_metrics(f"{d}/fp32.json"), read_metrics(f"{d}/int8.json"))
    write_json(f"{d}/compare.json", summary)
    write_json(f"{d}/compare_plot.json", rows)
    diff, ratio = summary["int8_minus_fp32"], summary["int8_over_fp32"]
    print(
        f"int8 vs fp32: test loss {diff['test_loss']:+.4f} nats/char, size {ratio['size_bytes']:.0%}, "
        f"speed {ratio['chars_per_s']:.2f}x -> {d}/compare.json"
    )


if __name__ == "__main__":
    run_stage(main)
