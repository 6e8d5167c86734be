"""One training recipe end to end: download, encode, train a fixed number of steps, evaluate.

The recipe is params.yaml with ``section.key=value`` overrides, written as for
``dvc exp run -S`` (each value read as YAML: ``quantize.op_types=[MatMul]``). It runs in a temporary project (the download cache stays the
project's own), through the same library calls as the DVC stages, and prints one JSON
object: validation loss (the best, and its curve, on the fixed training-time windows),
test loss over the whole test split, spelling rates, tokens/s and parameter count, e.g.
    python -m benchmarks.recipe train.max_steps=800
    python -m benchmarks.recipe train.max_steps=800 model.n_layer=6
    python -m benchmarks.recipe --params recipes/arithmetic/params.yaml train.seed=2
A key may name a list item by its index (``download.sources.0.arithmetic.answer=plain``).
On a corpus of equations the result also holds the held-out accuracy (``arithmetic``).
Loss after a fixed number of steps does not depend on the machine's load; tokens/s does.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.corpus.download import run_download
from pipeline.evaluation.evaluate import evaluate
from pipeline.params import Params, ParamsError, build, read_yaml_mapping
from pipeline.stage import run_stage
from pipeline.tokens.encode import encode_corpus
from pipeline.training.checkpoint import BEST
from pipeline.training.train import train


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` pairs set into ``raw`` (a copy). Each value is read as YAML, as
    ``dvc exp run -S`` reads it (``quantize.op_types=[MatMul]`` is a list), and coerced when built.

    A key may go deeper, a list item by its index: ``download.sources.0.arithmetic.seed=2``.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ParamsError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=800")
        set_value(out, key, _yaml_value(text, item), item)
    return out


def set_value(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    """``value`` set in place at the dotted ``key`` of ``raw``; a ParamsError naming the
    override ``item`` when the key leads nowhere in params.yaml."""
    path = key.split(".")
    if not (len(path) >= 2 and all(path)):
        raise ParamsError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=800")
    if not isinstance(raw.get(path[0]), dict):
        raise ParamsError(f"override {item!r}: params.yaml has no section '{path[0]}'")
    node = raw[path[0]]
    for i, part in enumerate(path[1:-1], start=1):
        node = _child(node, part, item, ".".join(path[: i + 1]))
    if isinstance(node, list):
        _child(node, path[-1], item, key)
        node[int(path[-1])] = value
    elif isinstance(node, dict):
        node[path[-1]] = value
    else:
        parent = ".".join(path[:-1])
        raise ParamsError(f"override {item!r}: '{parent}' is a single value, not a section; set it as {parent}=VALUE")


def _child(node: Any, part: str, item: str, where: str) -> Any:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    if isinstance(node, dict) and part in node:
        return node[part]
    raise ParamsError(f"override {item!r}: params.yaml has no '{where}'")


def _yaml_value(text: str, item: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError(f"override {item!r}: the value is not valid YAML ({problem}); quote it or fix it") from None


def run_recipe(raw: dict[str, Any], work: Path) -> dict[str, Any]:
    """Download, encode, train and evaluate ``raw`` (params data) with every output under ``work``."""
    raw = copy.deepcopy(raw)
    for key, folder in (("download.out_dir", "raw"), ("encode.out_dir", "encoded"),
                        ("train.out_dir", "checkpoints"), ("train.live_dir", "dvclive")):
        set_value(raw, key, str(work / folder), key)
    p: Params = build(Params, raw, "")
    with contextlib.redirect_stdout(sys.stderr):  # the training log; stdout carries the JSON alone
        run_download(p.download)
        meta = encode_corpus(p.download.out_dir, p.encode)
        run = train(p.model, p.train, p.encode.out_dir, progress=False)
        m = evaluate(Path(p.train.out_dir) / BEST, p.encode.out_dir, p.sample, p.evaluate.batch_size)["metrics"]
    with (Path(p.train.live_dir) / "plots" / "metrics" / "val" / "loss.tsv").open(newline="") as f:
        val_curve = {int(r["step"]): round(float(r["loss"]), 4) for r in csv.DictReader(f, delimiter="\t")}
    tokens = run["step"] * p.train.batch_size * p.model.block_size * p.train.grad_accum
    return {
        "steps": run["step"],
        "val_loss": round(m["val_loss"], 4),
        "test_loss": round(m["test_loss"], 4),
        "spelling_rate": round(m["spelling_rate"], 4),
        "spelling_rate_4plus": round(m["spelling_rate_4plus"], 4),
        "tokens_per_s": round(tokens / run["train_seconds"]),
        "train_seconds": round(run["train_seconds"], 1),
        "params": m["num_params"],
        "vocab_size": meta["vocab_size"],
        "train_tokens": meta["splits"]["train"],
        "dtype": run["dtype"],
        "threads": torch.get_num_threads(),
        "val_curve": val_curve,  # step -> loss on the fixed validation windows
        **({"arithmetic": m["arithmetic"]} if "arithmetic" in m else {}),  # a corpus of equations
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    ap.add_argument("--params", default="params.yaml", help="base params file (default: params.yaml)")
    a = ap.parse_args()
    raw = apply_overrides(read_yaml_mapping(Path(a.params)), a.overrides)
    with tempfile.TemporaryDirectory(prefix="chargen-recipe-") as tmp:
        result = run_recipe(raw, Path(tmp))
    params = [] if a.params == "params.yaml" else ["--params", a.params]
    command = "python -m benchmarks.recipe " + " ".join(map(shlex.quote, params + a.overrides))
    print(json.dumps({"command": command.strip(), "overrides": a.overrides, **result}))


if __name__ == "__main__":
    run_stage(main)
