"""DVC stage `compare@<precision>`: measure one exported model -> metrics/<precision>.json."""

from __future__ import annotations

import argparse

from pipeline.atomic import write_json
from pipeline.compare import PRECISIONS, measure_model
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--precision", required=True, choices=PRECISIONS, help="which model to measure")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--out", default=None, help="metrics file (default: metrics/<precision>.json)")
    args = ap.parse_args()
    params = load_params(args.params)
    path = params.export.out if args.precision == "fp32" else params.quantize.out
    m = measure_model(path, args.precision, params.encode.out_dir, params.sample, params.compare)
    out = args.out or f"metrics/{args.precision}.json"
    write_json(out, m)
    print(
        f"{args.precision}: test loss {m['test_loss']:.4f} nats/char, spelling {m['spelling_rate']:.1%}, "
        f"{m['size_bytes'] / 1e6:.2f} MB, {m['chars_per_s']:.0f} chars/s, first char "
        f"{m['first_char_s'] * 1e3:.1f} ms, peak RSS {m['peak_rss_mb']:.0f} MiB -> {out}"
    )


if __name__ == "__main__":
    run_stage(main)
