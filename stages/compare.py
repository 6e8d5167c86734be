"""DVC stage `compare@<precision>`: measure one exported model -> metrics/<precision>.json."""

from __future__ import annotations

import argparse

from chargen.arithmetic import describe
from chargen.contract import PRECISIONS, model_path
from pipeline.evaluation.compare import measure_model
from pipeline.evaluation.report import metrics_path
from pipeline.files import write_json
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", required=True, choices=PRECISIONS, help="which model to measure")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    params = load_params(args.params)
    path = model_path(args.precision, params.export.model_dir)
    m = measure_model(path, args.precision, params.encode.out_dir, params.sample, params.compare)
    out = metrics_path(params.compare.out_dir, args.precision)
    write_json(out, m)
    # An arithmetic corpus is judged by its answers; any other by its spelling.
    scores = describe(m["arithmetic"]) if "arithmetic" in m else f"spelling rate {m['spelling_rate']:.1%}"
    print(
        f"{args.precision}: test loss {m['test_nats_per_char']:.4f} nats/char, {scores}, "
        f"{m['size_bytes'] / 1e6:.2f} MB, {m['chars_per_s']:.0f} chars/s, first char "
        f"{m['first_char_s'] * 1e3:.1f} ms, peak RSS {m['peak_rss_mb']:.0f} MiB -> {out}"
    )


if __name__ == "__main__":
    run_stage(main)
