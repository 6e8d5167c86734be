"""Draft tables compared: how many characters one call yields and how fast one stream goes.

For each ``--tables`` entry CONTEXT:BITS:MIN_COUNT (``export.draft_context``,
``export.draft_bits``, ``export.draft_min_count``) the table is built from the encoded
train split, as the export stage builds it, and put in place of the model file's own;
then, after ``--context`` tokens of random context (the compare stage's measurement):
tokens per call over 5 seeds, the size the table takes in the model file, and
single-stream chars/s (median and best of ``--repeats`` runs, the tables taking turns
so that drift of the machine spreads over all of them). One intra-op thread. Prints one
JSON object, e.g.
    python -m benchmarks.draft --tables 3:15:1 4:17:1 4:17:3
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from benchmarks.decode import tokens_per_call
from benchmarks.options import MODEL_FILE, positive_int, require_file
from chargen.draft import MAX_BITS
from chargen.errors import ChargenError
from chargen.model import ChargenModel
from chargen.speed import measure_speed
from pipeline.export.draft import build_draft
from pipeline.params import load_params
from pipeline.stage import run_stage
from pipeline.tokens.splits import read_split

Table = tuple[int, int, int]  # context, bits, min_count


def parse_table(spec: str) -> Table:
    """An argparse ``type``: CONTEXT:BITS:MIN_COUNT -> the three integers, in the ranges the runtime accepts."""
    try:
        context, bits, min_count = (int(x) for x in spec.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not CONTEXT:BITS:MIN_COUNT (e.g. 4:17:3)") from None
    if context < 1 or not 1 <= bits <= MAX_BITS or min_count < 1:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: CONTEXT and MIN_COUNT must be at least 1 and BITS from 1 to {MAX_BITS} (e.g. 4:17:3)")
    return context, bits, min_count


def table_name(table: Table) -> str:
    return ":".join(map(str, table))


def measure(model: ChargenModel, specs: list[Table], context: int, chars: int,
            repeats: int, encoded_dir: str) -> dict[str, Any]:
    """Every table's tokens per call, stored size and speed, in the given model."""
    train = read_split(encoded_dir, "train")
    tables = {table_name(sizes): build_draft(train, model.vocab_size, *sizes) for sizes in specs}
    speeds: dict[str, list[float]] = {spec: [] for spec in tables}
    for r in range(repeats):
        for spec, table in tables.items():
            model.draft = table
            if r == 0:
                measure_speed(model, context, 20)  # warm-up
            speeds[spec].append(measure_speed(model, context, chars, seed=r)["chars_per_s"])
    rows = {}
    for spec, table in tables.items():
        model.draft = table
        rows[spec] = {"tokens_per_call": tokens_per_call(model, context, chars),
                      "stored_bytes": len(json.dumps(table.describe())),
                      "guessing_buckets": float((table.table != table.none).mean()),
                      "chars_per_s_median": statistics.median(speeds[spec]),
                      "chars_per_s_best": max(speeds[spec])}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/model.int8.onnx")
    ap.add_argument("--tables", nargs="+", type=parse_table, default=[(3, 15, 1), (4, 17, 1), (4, 17, 3)],
                    help="CONTEXT:BITS:MIN_COUNT")
    ap.add_argument("--encoded", help="the encoded splits (default: encode.out_dir of --params)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--context", type=positive_int, default=1000, help="tokens in context before the timing")
    ap.add_argument("--chars", type=positive_int, default=2000, help="characters timed per run")
    ap.add_argument("--repeats", type=positive_int, default=10, help="timed runs per table")
    a = ap.parse_args()
    model = ChargenModel.load(require_file(a.model, "--model", MODEL_FILE), threads=1)
    if model.config.pos_encoding != "rope":
        raise ChargenError(f"{a.model} has learned positions: it decodes one token per call, without a draft")
    encoded = a.encoded or load_params(a.params).encode.out_dir
    rows = measure(model, a.tables, a.context, a.chars, a.repeats, encoded)
    print(json.dumps({"model": a.model, "context": a.context, "tables": rows}, indent=2))


if __name__ == "__main__":
    run_stage(main)
