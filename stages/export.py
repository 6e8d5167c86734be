"""DVC stage `export`: checkpoints/best.pt (+ the train split's draft table) -> models/model.fp32.onnx
(verified against PyTorch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from chargen.contract import model_path
from pipeline.export.model_file import export_checkpoint
from pipeline.params import load_params
from pipeline.stage import run_stage
from pipeline.training.checkpoint import BEST


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    s = export_checkpoint(
        checkpoint=Path(params.train.out_dir) / BEST,
        encoded_dir=params.encode.out_dir,
        metrics_path=params.evaluate.out,
        out=model_path("fp32", params.export.model_dir),
        opset=params.export.opset,
        atol=params.export.parity_atol,
        draft_context=params.export.draft_context,
        draft_bits=params.export.draft_bits,
        draft_min_count=params.export.draft_min_count,
    )
    print(
        f"exported {s['num_params']:,} parameters to {s['path']} ({s['size_bytes'] / 1e6:.2f} MB, "
        f"opset {params.export.opset}); ONNX Runtime matches PyTorch within {s['max_abs_diff']:.1e}"
    )


if __name__ == "__main__":
    run_stage(main)
