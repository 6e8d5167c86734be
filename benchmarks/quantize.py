"""What int8 and int4 buy: the quantization choices on the trained model, and speed by width.

Two measurements behind the README's quantization tables, printed as one JSON object:

- ``choices``: the exported fp32 model (``--model``) quantized four ways (the weight
  MatMuls only; MatMuls and the embedding/n-gram Gathers per tensor with reduce_range,
  the default; the same with per-channel scales; without reduce_range) and int4 with blocks
  of each ``INT4_BLOCKS`` size, each with its size relative to fp32, test loss over the whole test split of ``--encoded`` and single-stream chars/s.
- ``widths``: random-init 4-layer models of each ``--widths`` value (speed does not
  depend on the weights), fp32 and int8 chars/s and their ratio.

Every model is timed interleaved with the others in this one process (best of
``--repeats`` runs of ``--chars`` characters after ``--context`` characters, one
thread, CPU time), so machine noise hits all of them alike.  E.g.
    python -m benchmarks.quantize
    python -m benchmarks.quantize --no-choices --widths 128 192 256 320
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.options import positive_int
from chargen.model import ChargenModel
from chargen.scoring import score, scored_chars, summarize
from chargen.speed import measure_speed
from pipeline.export.model_file import export_onnx
from pipeline.export.quantize import quantize_int4, quantize_int8
from pipeline.model import GPT, GPTConfig
from pipeline.params import load_params
from pipeline.stage import run_stage
from pipeline.tokens.splits import TOKENIZER_FILE, read_split, read_tokenizer

CHOICES = {  # name -> (op_types, per_channel, reduce_range)
    "matmul_only": (("MatMul",), False, True),
    "matmul_and_gather": (("MatMul", "Gather"), False, True),
    "per_channel": (("MatMul", "Gather"), True, True),
    "no_reduce_range": (("MatMul", "Gather"), False, False),
}
INT4_BLOCKS = (32, 64, 128)  # int4 weights per fp32 scale


def best_speeds(models: dict[str, ChargenModel], a: argparse.Namespace) -> dict[str, float]:
    """Best chars/s (CPU time) of each model, timed round-robin."""
    best = dict.fromkeys(models, 0.0)
    for r in range(a.repeats):
        for name, m in models.items():
            best[name] = max(best[name], measure_speed(m, a.context, a.chars, seed=r)["chars_per_s_cpu"])
    return best


def choices(a: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    fp32 = Path(a.model)
    paths = {"fp32": fp32}
    base = load_params(a.params).quantize
    for name, (ops, per_channel, reduce_range) in CHOICES.items():
        paths[name] = tmp / f"{name}.onnx"
        quantize_int8(fp32, paths[name], replace(base, op_types=ops, per_channel=per_channel, reduce_range=reduce_range))
    for block in INT4_BLOCKS:
        paths[f"int4_block{block}"] = tmp / f"int4_block{block}.onnx"
        quantize_int4(fp32, paths[f"int4_block{block}"], replace(base, int4_block_size=block))
    models = {name: ChargenModel.load(p, threads=1) for name, p in paths.items()}
    test = read_split(a.encoded, "test")
    speeds = best_speeds(models, a)
    out = {}
    for name, m in models.items():
        total, n = score(m, test)
        out[name] = {
            "size_frac_of_fp32": paths[name].stat().st_size / fp32.stat().st_size,
            "test_loss": summarize(total, n, scored_chars(test, m.tokenizer.chars_per_token()))["loss"],
            "chars_per_s": speeds[name],
            "speed_over_fp32": speeds[name] / speeds["fp32"],
        }
    return out


def widths(a: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    tokenizer = read_tokenizer(a.encoded)
    models = {}
    for width in a.widths:
        torch.manual_seed(0)
        shape = replace(load_params(a.params).model, n_layer=4, n_head=width // 32, n_embd=width)
        cfg = GPTConfig.from_params(shape, tokenizer.size)
        fp32, int8 = tmp / f"w{width}.fp32.onnx", tmp / f"w{width}.int8.onnx"
        export_onnx(GPT(cfg).eval(), tokenizer, fp32, {})
        quantize_int8(fp32, int8, load_params(a.params).quantize)
        models[f"{width}/fp32"] = ChargenModel.load(fp32, threads=1)
        models[f"{width}/int8"] = ChargenModel.load(int8, threads=1)
    speeds = best_speeds(models, a)
    return {
        str(w): {
            "fp32_chars_per_s": speeds[f"{w}/fp32"],
            "int8_chars_per_s": speeds[f"{w}/int8"],
            "int8_over_fp32": speeds[f"{w}/int8"] / speeds[f"{w}/fp32"],
        }
        for w in a.widths
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/model.fp32.onnx", help="exported fp32 model")
    ap.add_argument("--params", default="params.yaml", help="the quantize params, and the model shape of the width sweep")
    ap.add_argument("--encoded", default="data/encoded", help="encode stage output (test split, tokenizer)")
    ap.add_argument("--widths", type=int, nargs="*", default=[128, 192, 256], help="multiples of 32")
    ap.add_argument("--no-choices", action="store_true", help="only the width sweep")
    ap.add_argument("--context", type=positive_int, default=1000, help="tokens in context before the timing")
    ap.add_argument("--chars", type=positive_int, default=2000, help="characters timed per run")
    ap.add_argument("--repeats", type=positive_int, default=6, help="timed runs per model (best kept)")
    a = ap.parse_args()
    if any(w <= 0 or w % 32 for w in a.widths):
        ap.error("--widths must be positive multiples of 32 (heads of 32 channels)")
    if not a.no_choices and not Path(a.model).is_file():
        ap.error(f"{a.model} does not exist; run `dvc repro` first or pass --model")
    if not Path(a.encoded, TOKENIZER_FILE).is_file():
        ap.error(f"{a.encoded}/{TOKENIZER_FILE} does not exist; run `dvc repro encode` first or pass --encoded")
    result = {"context": a.context, "timed_chars": a.chars, "repeats": a.repeats, "threads": 1}
    with tempfile.TemporaryDirectory(prefix="chargen-bench-") as tmp:
        if not a.no_choices:
            result["choices"] = choices(a, Path(tmp))
        if a.widths:
            result["widths"] = widths(a, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_stage(main)
