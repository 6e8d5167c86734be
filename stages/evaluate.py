"""DVC stage `evaluate`: test loss, spelling rate and before/after samples of the best checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from chargen.arithmetic import describe
from pipeline.evaluation.evaluate import evaluate, write_outputs
from pipeline.params import load_params
from pipeline.stage import run_stage
from pipeline.training.checkpoint import BEST


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    result = evaluate(Path(params.train.out_dir) / BEST, params.encode.out_dir, params.sample,
                      params.evaluate.batch_size, params.finetune.init_from)
    write_outputs(result, params.sample, params.evaluate.out, params.evaluate.samples)
    m = result["metrics"]
    # An arithmetic corpus is judged by its answers; any other by its spelling.
    scores = describe(m["arithmetic"]) if "arithmetic" in m else f"spelling rate {m['spelling_rate']:.1%}"
    print(
        f"test loss {m['test_nats_per_char']:.4f} nats/char ({m['test_bpc']:.3f} bpc; "
        f"{m['test_loss']:.4f} nats/token, {m['chars_per_token']:.2f} chars/token), "
        f"{scores} -> {params.evaluate.out}"
    )


if __name__ == "__main__":
    run_stage(main)
