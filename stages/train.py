"""DVC stage `train`: train (or resume) the model on data/encoded into checkpoints/."""

from __future__ import annotations

import argparse

from pipeline.params import load_params
from pipeline.stage import run_stage
from pipeline.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--encoded", default=None, help="encoded data dir (default: encode.out_dir)")
    ap.add_argument("--live-dir", default="dvclive", help="dvclive output dir (default: dvclive)")
    args = ap.parse_args()
    params = load_params(args.params)
    summary = train(params, args.encoded or params.encode.out_dir, args.live_dir)
    if summary.get("rank", 0) == 0:
        print(
            f"trained {summary['step']} steps in {summary['train_seconds']:.0f} s: "
            f"best val loss {summary['best_val_loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s"
        )


if __name__ == "__main__":
    run_stage(main)
