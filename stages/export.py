"""DVC stage `export`: checkpoints/best.pt -> models/model.fp32.onnx (verified against PyTorch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.export import export_checkpoint
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = ap.parse_args()
    params = load_params(args.params)
    s = export_checkpoint(
        checkpoint=params.evaluate.checkpoint,
        vocab_path=Path(params.encode.out_dir) / "vocab.json",
        metrics_path=params.evaluate.out,
        out=params.export.out,
        opset=params.export.opset,
        atol=params.export.parity_atol,
    )
    print(
        f"exported {s['num_params']:,} parameters to {s['path']} ({s['size_bytes'] / 1e6:.2f} MB, "
        f"opset {params.export.opset}); ONNX Runtime matches PyTorch within {s['max_abs_diff']:.1e}"
    )


if __name__ == "__main__":
    run_stage(main)
