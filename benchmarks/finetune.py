"""Fine-tuning the trained default model on a small corpus of another style, against training from scratch.

Runs the real library in a temporary project: downloads Django's documentation
(reStructuredText prose, ``docs/topics/*.txt``, about 0.3 MB) from the package index,
encodes it with the base model's tokenizer, then trains for the same number of steps
from scratch (the ``train`` recipe) and from the base with each fine-tuning method (the
``finetune`` recipe, early stopping off so every run takes the same steps), and
evaluates each best checkpoint on the test split; the base model itself is measured
zero-shot. Prints one JSON object:

    python -m benchmarks.finetune --base base/shakespeare.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.options import positive_int, require_file
from chargen.errors import ChargenError
from pipeline.corpus.download import run_download
from pipeline.evaluation.evaluate import evaluate
from pipeline.params import Params, Source, load_params
from pipeline.stage import run_stage
from pipeline.tokens.encode import encode_corpus
from pipeline.training.checkpoint import BEST
from pipeline.training.finetune import Base, FinetuneError, finetune_tokenizer, load_base
from pipeline.training.train import train

DJANGO = Source(
    name="django", index="Django==5.1.4",
    sha256="de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a",
    members="Django-5.1.4/docs/topics/*.txt",
)
METHODS = ("full", "freeze", "lora")


def read_base(path: Path) -> Base:
    """The ``--base`` checkpoint, read before anything is downloaded; a one-line error naming
    the option when it is missing or unusable."""
    require_file(path, "--base", "a checkpoint the train stage wrote (e.g. checkpoints/best.pt)")
    try:
        return load_base(path)
    except FinetuneError as e:  # its message names finetune.init_from, which this script sets from --base
        raise ChargenError(f"--base: {str(e).removeprefix('finetune.init_from: ')}") from None


def run(params: Params, base: Base, steps: int, prompt: str, work: Path) -> dict[str, Any]:
    download = dataclasses.replace(params.download, sources=(DJANGO,), out_dir=str(work / "raw"),
                                   cache_dir=str(Path(params.download.cache_dir).resolve()))
    run_download(download)
    encoded = work / "encoded"
    vocabulary = partial(finetune_tokenizer, base, new_chars=params.finetune.new_chars,
                         normalize_nfc=params.encode.normalize_nfc)
    meta = encode_corpus(download.out_dir, dataclasses.replace(params.encode, out_dir=str(encoded)), vocabulary)
    sample = dataclasses.replace(params.sample, prompt=prompt)
    results: dict[str, Any] = {}
    for name in ("scratch", *METHODS):
        out = work / name
        t = dataclasses.replace(params.train, out_dir=str(out / "checkpoints"), live_dir=str(out / "live"),
                                max_steps=steps, eval_interval=params.finetune.eval_interval)
        f = None
        if name != "scratch":
            f = dataclasses.replace(params.finetune, base_dir=str(base.path.parent), init_from=str(base.path),
                                    method=name, max_steps=steps, patience=0)
        t0 = time.perf_counter()
        summary = train(params.model, t, encoded, f, progress=False)
        wall = time.perf_counter() - t0
        # The zero-shot base is measured once, alongside the full fine-tune.
        ev = evaluate(out / "checkpoints" / BEST, encoded, sample, params.evaluate.batch_size,
                      str(base.path) if name == "full" else "")
        m = ev["metrics"]
        if name == "full":
            results["zero_shot"] = {"test_loss": m["zero_shot_test_loss"], "spelling_rate": m["zero_shot_spelling_rate"],
                                    "trainable_params": 0, "train_seconds": 0.0}
        results[name] = {
            "test_loss": m["test_loss"], "spelling_rate": m["spelling_rate"], "best_val_loss": summary["best_val_loss"],
            "step": summary["step"], "trainable_params": summary["trainable_params"],
            "train_seconds": round(summary["train_seconds"], 1), "wall_seconds": round(wall, 1),
            "sample": (prompt + ev["trained"][0])[:300],
        }
        if name == "full":
            results["zero_shot"]["sample"] = (prompt + ev["untrained"][0])[:300]
    return {"corpus": DJANGO.members, "base": str(base.path), "steps": steps, "vocab_size": meta["vocab_size"],
            "splits": meta["splits"], "new_chars": params.finetune.new_chars, "runs": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--base", type=Path, required=True, help="a trained chargen checkpoint")
    ap.add_argument("--steps", type=positive_int, default=300, help="training steps of every run")
    ap.add_argument("--prompt", default="The ", help="sample prompt for the spelling rate")
    a = ap.parse_args()
    params = load_params(a.params)
    base = read_base(a.base.resolve())
    with tempfile.TemporaryDirectory(prefix="chargen-finetune-") as tmp:
        print(json.dumps(run(params, base, a.steps, a.prompt, Path(tmp)), indent=2))


if __name__ == "__main__":
    run_stage(main)
