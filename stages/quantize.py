"""DVC stage `quantize`: models/model.fp32.onnx -> models/model.int8.onnx (dynamic int8)."""

from __future__ import annotations

import argparse

from chargen.contract import model_path
from pipeline.export.quantize import quantize_int8
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    q = params.quantize
    src, out = model_path("fp32", params.export.model_dir), model_path("int8", params.export.model_dir)
    quantize_int8(src, out, q)
    ratio = out.stat().st_size / src.stat().st_size
    print(
        f"quantized {'+'.join(q.op_types)} weights to int8 (per_channel={q.per_channel}, "
        f"reduce_range={q.reduce_range}): {out} {out.stat().st_size / 1e6:.2f} MB, {ratio:.0%} of fp32"
    )


if __name__ == "__main__":
    run_stage(main)
