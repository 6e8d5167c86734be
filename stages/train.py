"""DVC stage `train`: train (or resume) the model on data/encoded into checkpoints/, from scratch
or from the base checkpoint ``finetune.init_from``."""

from __future__ import annotations

import argparse

from pipeline.params import load_params
from pipeline.stage import run_stage
from pipeline.training.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    summary = train(params.model, params.train, params.encode.out_dir, params.finetune)
    if summary.get("rank", 0) == 0:
        stopped = " (stopped early on request)" if summary["stopped_early"] else ""
        print(
            f"trained {summary['step']} steps{stopped} in {summary['train_seconds']:.0f} s: "
            f"best val loss {summary['best_val_loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s "
            f"({summary['chars_per_s']:,.0f} chars/s)"
        )


if __name__ == "__main__":
    run_stage(main)
