"""Plain or reversed answers: the arithmetic recipe trained for the same steps on each format.

For each answer format, builds a temporary project from the recipe's params
(``--params``, default recipes/arithmetic/params.yaml; only ``answer`` and
``train.max_steps`` changed), generates and encodes the corpus,
trains, and measures held-out exact-match accuracy of the best checkpoint in PyTorch as
the evaluate stage does. Both formats hold out the very same problems (the split is a
hash of the problem, not of its answer). Prints one JSON object, e.g.
    python -m benchmarks.arithmetic_format --steps 600
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from chargen.errors import ChargenError
from pipeline.corpus.download import run_download
from pipeline.evaluation.evaluate import evaluate
from pipeline.params import load_params
from pipeline.tokens.encode import encode_corpus
from pipeline.training.checkpoint import BEST
from pipeline.training.train import train

RECIPE = Path("recipes/arithmetic/params.yaml")


def run_format(params: Path, answer: str, steps: int, root: Path) -> dict:
    p = load_params(params)
    source = p.download.sources[0]
    source = dataclasses.replace(source, arithmetic=dataclasses.replace(source.arithmetic, answer=answer))
    raw, encoded = root / "raw", root / "encoded"
    run_download(dataclasses.replace(p.download, sources=(source,), out_dir=str(raw)))
    encode_corpus(raw, dataclasses.replace(p.encode, out_dir=str(encoded)))
    t = dataclasses.replace(p.train, max_steps=steps, out_dir=str(root / "checkpoints"),
                            live_dir=str(root / "dvclive"))
    t0 = time.perf_counter()
    summary = train(p.model, t, encoded, progress=False)
    train_s = time.perf_counter() - t0
    m = evaluate(Path(t.out_dir) / BEST, encoded, p.sample, p.evaluate.batch_size)["metrics"]
    a = m["arithmetic"]
    return {
        "steps": summary["step"], "train_s_wall": round(train_s, 1), "val_loss": round(summary["best_val_loss"], 4),
        "accuracy": a["accuracy"], "accuracy_longer": a["accuracy_longer"],
        **{op: {cell: v for cell, v in a[op].items()} for op in ("add", "sub", "mul") if op in a},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=RECIPE, help=f"the recipe's params file (default: {RECIPE})")
    ap.add_argument("--steps", type=int, default=600, help="training steps per format")
    a = ap.parse_args()
    result = {}
    for answer in ("reversed", "plain"):
        with tempfile.TemporaryDirectory(prefix=f"arith-{answer}-") as tmp:
            try:
                with contextlib.redirect_stdout(sys.stderr):  # the training log; stdout carries the JSON alone
                    result[answer] = run_format(a.params, answer, a.steps, Path(tmp))
            except ChargenError as e:
                sys.exit(f"error: {e}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
