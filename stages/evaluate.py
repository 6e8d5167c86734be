"""DVC stage `evaluate`: test loss, spelling rate and before/after samples of the best checkpoint."""

from __future__ import annotations

import argparse

from pipeline.evaluate import evaluate, write_outputs
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--encoded", default=None, help="encoded data dir (default: encode.out_dir)")
    args = ap.parse_args()
    params = load_params(args.params)
    result = evaluate(params, params.evaluate.checkpoint, args.encoded or params.encode.out_dir)
    write_outputs(result, params, params.evaluate.samples)
    m = result["metrics"]
    print(
        f"test loss {m['test_loss']:.4f} nats/char ({m['test_bpc']:.3f} bpc, perplexity "
        f"{m['test_perplexity']:.2f}), spelling rate {m['spelling_rate']:.1%} -> {params.evaluate.out}"
    )


if __name__ == "__main__":
    run_stage(main)
