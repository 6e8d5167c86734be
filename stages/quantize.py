"""DVC stage `quantize`: models/model.fp32.onnx -> models/model.int8.onnx (dynamic int8)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.params import load_params
from pipeline.quantize import quantize_int8
from pipeline.stage import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = ap.parse_args()
    params = load_params(args.params)
    q = params.quantize
    quantize_int8(params.export.out, q.out, q.op_types, per_channel=q.per_channel, reduce_range=q.reduce_range)
    src, out = Path(params.export.out).stat().st_size, Path(q.out).stat().st_size
    print(
        f"quantized {'+'.join(q.op_types)} weights to int8 (per_channel={q.per_channel}, "
        f"reduce_range={q.reduce_range}): {q.out} {out / 1e6:.2f} MB, {out / src:.0%} of fp32"
    )


if __name__ == "__main__":
    run_stage(main)
