"""DVC stage `quantize`: models/model.fp32.onnx -> models/model.int8.onnx (dynamic int8) and
models/model.int4.onnx (4-bit weight-only blocks)."""

from __future__ import annotations

import argparse

from chargen.contract import model_path
from pipeline.export.quantize import quantize_int4, quantize_int8
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    q = params.quantize
    src = model_path("fp32", params.export.model_dir)
    int8, int4 = model_path("int8", params.export.model_dir), model_path("int4", params.export.model_dir)
    quantize_int8(src, int8, q)
    quantize_int4(src, int4, q)
    settings = {
        int8: f"int8 (per_channel={q.per_channel}, reduce_range={q.reduce_range})",
        int4: f"int4 (blocks of {q.int4_block_size})",
    }
    for out, how in settings.items():
        ratio = out.stat().st_size / src.stat().st_size
        print(f"quantized {'+'.join(q.op_types)} weights to {how}: {out} "
              f"{out.stat().st_size / 1e6:.2f} MB, {ratio:.0%} of fp32")


if __name__ == "__main__":
    run_stage(main)
