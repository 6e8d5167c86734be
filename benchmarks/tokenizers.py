"""Char, byte and BPE tokenizers compared at equal training wall-clock, per character.

Each row is the default model and recipe (params.yaml) on the default corpus with one
tokenizer, trained for the number of steps its measured speed gives in ``--budget-s``
seconds. Four commands, so that only the timed ones need the machine to themselves:

    python -m benchmarks.tokenizers prepare --out DIR     # download, encode each row
    python -m benchmarks.tokenizers throughput --out DIR  # timed: training steps/s of each row
    python -m benchmarks.tokenizers train --out DIR --budget-s 90   # fixed steps; evaluate, export, quantize
    python -m benchmarks.tokenizers speed --out DIR       # timed: int8 chars/s; prints the table

Each writes DIR/<command>.json; ``speed`` prints every row as one JSON object. The BPE
rows drop the exact bigram table, which has (V + 1) x V rows (134 M parameters at
V = 1,024); the hashed trigram table stays in every row.
"""

from __future__ import annotations

import argparse
import json
import time
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.generate import process_first_char
from benchmarks.options import make_dir, positive_float, positive_int
from benchmarks.train_throughput import measure
from chargen.errors import ChargenError
from chargen.model import ChargenModel
from chargen.scoring import score, scored_chars, summarize
from pipeline.corpus.download import run_download
from pipeline.evaluation.compare import time_generation
from pipeline.evaluation.evaluate import evaluate, write_outputs
from pipeline.export.model_file import export_checkpoint
from pipeline.export.quantize import quantize_int8
from pipeline.files import write_json
from pipeline.params import EncodeParams, ModelParams, Params, TrainParams, load_params
from pipeline.stage import run_stage
from pipeline.tokens.encode import encode_corpus
from pipeline.tokens.splits import read_meta, read_scored_split
from pipeline.training.checkpoint import BEST
from pipeline.training.train import train

ROWS = ["char", "byte", "bpe:512", "bpe:1024", "bpe:4096"]
# command -> the earlier commands whose results it reads
NEEDS: dict[str, tuple[str, ...]] = {
    "prepare": (), "throughput": ("prepare",), "train": ("throughput",), "speed": ("prepare", "throughput", "train"),
}
# The tokenizers a row may name: the values encode.tokenizer takes.
KINDS: tuple[str, ...] = typing.get_args(typing.get_type_hints(EncodeParams)["tokenizer"])


def parse_row(spec: str) -> str:
    """An argparse ``type``: a row, KIND or KIND:VOCAB_SIZE with KIND one of encode.tokenizer's values."""
    kind, sep, size = spec.partition(":")
    if kind not in KINDS or (sep and not (size.isdigit() and int(size) > 0)):
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not KIND or KIND:VOCAB_SIZE with KIND one of {', '.join(KINDS)} (e.g. bpe:1024)")
    return spec


def row_dir(out: Path, row: str) -> Path:
    return out / row.replace(":", "_")


def row_model(params: Params, row: str) -> ModelParams:
    return replace(params.model, bigram=params.model.bigram and not row.startswith("bpe"))


def row_train(params: Params, out: Path, row: str, steps: int) -> TrainParams:
    """The default recipe cut to ``steps``: the same share of warm-up, one evaluation at the end."""
    t = params.train
    warmup = max(1, round(t.warmup_steps * steps / t.max_steps))
    return replace(t, max_steps=steps, warmup_steps=warmup, eval_interval=steps, checkpoint_interval=steps,
                   out_dir=str(row_dir(out, row) / "checkpoints"), live_dir=str(row_dir(out, row) / "dvclive"))


def encoded(out: Path, row: str) -> Path:
    return row_dir(out, row) / "encoded"


def prepare(params: Params, out: Path, rows: list[str]) -> dict[str, Any]:
    raw = out / "raw"
    run_download(replace(params.download, out_dir=str(raw)))
    result = {}
    for row in rows:
        kind, _, size = row.partition(":")
        e = replace(params.encode, out_dir=str(encoded(out, row)), tokenizer=kind,
                    vocab_size=int(size) if size else params.encode.vocab_size)
        t0 = time.perf_counter()
        meta = encode_corpus(raw, e)
        result[row] = {"vocab_size": meta["vocab_size"], "encode_s": round(time.perf_counter() - t0, 1),
                       "train_chars_per_token": meta["chars"]["train"] / meta["splits"]["train"],
                       "test_chars_per_token": meta["chars"]["test"] / meta["splits"]["test"],
                       "test_chars": meta["chars"]["test"]}
    return result


def throughput(params: Params, out: Path, rows: list[str], steps: int) -> dict[str, Any]:
    # The first timing in a process runs slow (thread pool, allocator): it is thrown away.
    measure(row_model(params, rows[0]), params.train, read_meta(encoded(out, rows[0]))["vocab_size"], 3, steps)
    result = {}
    for row in rows:
        meta = read_meta(encoded(out, row))
        speed = measure(row_model(params, row), params.train, meta["vocab_size"], warmup=3, steps=steps)
        chars_per_token = meta["chars"]["train"] / meta["splits"]["train"]
        result[row] = {**speed, "chars_per_s": round(speed["tokens_per_s"] * chars_per_token)}
    return result


def onnx_test_loss(path: Path, encoded_dir: Path) -> dict[str, float | int]:
    model = ChargenModel.load(path)
    ids = read_scored_split(encoded_dir, model.tokenizer)
    total, n = score(model, ids)
    return summarize(total, n, scored_chars(ids, model.tokenizer.chars_per_token()))


def train_row(params: Params, out: Path, row: str, steps: int) -> dict[str, Any]:
    d, enc = row_dir(out, row), encoded(out, row)
    t0 = time.perf_counter()
    summary = train(row_model(params, row), row_train(params, out, row, steps), enc, progress=False)
    train_s = time.perf_counter() - t0
    model = summary["model"]
    tables = model.wte.weight.numel() + sum(p.numel() for p in (model.ngram.parameters() if model.ngram else []))
    checkpoint = d / "checkpoints" / BEST
    evaluated = evaluate(checkpoint, enc, params.sample, params.evaluate.batch_size)
    write_outputs(evaluated, params.sample, d / "eval.json", d / "samples.md")
    fp32, int8 = d / "model.fp32.onnx", d / "model.int8.onnx"
    exported = export_checkpoint(checkpoint, enc, d / "eval.json", fp32, opset=params.export.opset,
                                 atol=params.export.parity_atol)
    quantize_int8(fp32, int8, params.quantize)
    m, q = onnx_test_loss(fp32, enc), onnx_test_loss(int8, enc)
    e = evaluated["metrics"]
    return {
        "steps": steps, "train_s_on_shared_cores": round(train_s, 1),
        "test_nats_per_char": e["test_nats_per_char"], "test_bpc": e["test_bpc"],
        "test_loss_per_token": e["test_loss"], "chars_per_token": e["chars_per_token"],
        "context_chars": e["context_chars"], "spelling_rate": e["spelling_rate"],
        "num_params": e["num_params"], "lookup_table_params": tables, "lookup_table_share": tables / e["num_params"],
        "parity_max_abs_diff": exported["max_abs_diff"],
        "fp32_nats_per_char": m["nats_per_char"], "int8_nats_per_char": q["nats_per_char"],
        "int8_minus_fp32_nats_per_char": q["nats_per_char"] - m["nats_per_char"],
    }


def speed(params: Params, out: Path, rows: list[str], repeats: int) -> dict[str, Any]:
    c = params.compare
    result = {}
    for row in rows:
        model = ChargenModel.load(row_dir(out, row) / "model.int8.onnx", threads=c.threads)
        runs = [time_generation(model, c.long_context, c.timed_chars, r) for r in range(repeats)]
        start = process_first_char(row_dir(out, row) / "model.int8.onnx", repeats)
        result[row] = {"int8_chars_per_s": max(r["chars_per_s"] for r in runs),
                       "int8_process_start_to_first_char_s": start["first_char_s_median"]}
    return result


def read_step(out: Path, name: str, rows: list[str]) -> dict[str, Any]:
    """``out/<name>.json``; a ChargenError saying what to run when it lacks one of ``rows``."""
    path = out / f"{name}.json"
    try:
        done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChargenError(f"{path} is unreadable ({e}); run its command again") from None
    missing = [row for row in rows if row not in done]
    if missing:
        what = f"has no row {missing[0]}" if done else "is missing"
        raise ChargenError(f"{path} {what}: run "
                           f"`python -m benchmarks.tokenizers {name} --out {out} --rows {' '.join(missing)}` first")
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=list(NEEDS))
    ap.add_argument("--out", type=Path, required=True, help="working folder of the experiment")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rows", nargs="+", type=parse_row, default=ROWS, help="char, byte or bpe:VOCAB_SIZE")
    ap.add_argument("--budget-s", type=positive_float, default=90.0, help="training seconds of every row")
    ap.add_argument("--timed-steps", type=positive_int, default=10, help="training steps timed per row")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed generations per row (best kept)")
    a = ap.parse_args()
    # The results of the earlier commands this one needs, checked before it does anything.
    earlier = {step: read_step(a.out, step, a.rows) for step in NEEDS[a.step]}
    params = load_params(a.params)
    if a.step == "prepare":
        result = prepare(params, make_dir(a.out, "--out"), a.rows)
    elif a.step == "throughput":
        result = throughput(params, a.out, a.rows, a.timed_steps)
    elif a.step == "train":
        rates = earlier["throughput"]
        result = {row: {"budget_s": a.budget_s,
                        **train_row(params, a.out, row, max(1, round(a.budget_s * rates[row]["steps_per_s"])))}
                  for row in a.rows}
    else:
        result = speed(params, a.out, a.rows, a.repeats)
    # Rows run again, or apart, replace their own entry and keep the others'.
    path = a.out / f"{a.step}.json"
    result = {**read_step(a.out, a.step, []), **result}
    write_json(path, result)
    if a.step != "speed":
        print(json.dumps(result, indent=1))
        return
    prepared, rates, trained = earlier["prepare"], earlier["throughput"], earlier["train"]
    print(json.dumps({
        "test_chars": prepared[a.rows[0]]["test_chars"],
        "rows": [
            {"tokenizer": row, "vocab_size": prepared[row]["vocab_size"], **trained[row],
             "train_tokens_per_s": rates[row]["tokens_per_s"], "train_chars_per_s": rates[row]["chars_per_s"],
             **result[row]}
            for row in a.rows
        ],
    }, indent=1))


if __name__ == "__main__":
    run_stage(main)
