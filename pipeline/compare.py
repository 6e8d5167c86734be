"""fp32 vs int8: measure each exported model with ONNX Runtime, then report the differences.

Both precisions are measured the same way, on the same data, through the same
runtime the CLI uses (``pipeline.runtime``): test loss over the whole test split
(the windows of ``pipeline.scoring``, so it is comparable with the evaluate stage),
the spelling rate of samples drawn with the ``sample`` params, file size,
single-stream generation speed with a long context, time to the first character
and the peak memory of a process that loads the model and generates.

No torch here: this measures the ONNX files as users run them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import batches
from pipeline.errors import ChargenError
from pipeline.jsonfile import read_object
from pipeline.params import CompareParams, SampleParams
from pipeline.runtime import ChargenModel, measure_speed
from pipeline.scoring import summarize
from pipeline.spelling import spelling_rate, training_words

PRECISIONS = ("fp32", "int8")
# The differences and ratios the report shows, in this order.
REPORTED = ("test_loss", "test_bpc", "spelling_rate", "size_bytes", "chars_per_s", "first_char_s", "peak_rss_mb")
PLOTTED = {  # metric -> label in the side-by-side plot
    "chars_per_s": "generation chars/s",
    "first_char_s": "time to first char",
    "size_bytes": "file size",
    "peak_rss_mb": "peak memory",
    "test_loss": "test loss",
    "spelling_rate": "spelling rate",
}


class CompareError(ChargenError):
    """Inputs of the compare or report stage are missing or unusable."""


def read_split(encoded_dir: str | Path, split: str) -> np.ndarray:
    """One encoded split as a token id array, with enough tokens to score."""
    ids = batches.read_split(encoded_dir, split)
    if ids.size < 2:
        raise CompareError(f"{Path(encoded_dir) / split}.bin has fewer than 2 tokens; nothing to score (check encode fractions)")
    return ids


def samples(model: ChargenModel, sample: SampleParams) -> list[str]:
    """``sample.num_samples`` continuations of the prompt, ``sample.chars`` characters each."""
    texts = [""] * sample.num_samples
    steps = model.generate(
        sample.prompt, sample.chars, temperature=sample.temperature, top_k=sample.top_k,
        seed=sample.seed, num_samples=sample.num_samples, stop_at_eot=False,
    )
    for chars in steps:
        texts = [t + c for t, c in zip(texts, chars, strict=True)]
    return texts


# A fresh interpreter that only loads the model and generates: its peak RSS is the
# memory a user's `chargen generate` needs, free of this process's test data.
_RSS_PROBE = """
import resource, sys
from pipeline.runtime import ChargenModel, measure_speed
model = ChargenModel.load(sys.argv[1], threads=int(sys.argv[2]))
measure_speed(model, int(sys.argv[3]), int(sys.argv[4]))
kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
print(kib / 2**20 if sys.platform == "darwin" else kib / 2**10)
"""


def peak_rss_mb(path: str | Path, threads: int, context: int, chars: int) -> float:
    """Peak resident memory (MiB) of a process that loads ``path`` and generates."""
    args = [sys.executable, "-c", _RSS_PROBE, str(path), str(threads), str(context), str(chars)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompareError(f"{path}: the memory probe failed ({last})")
    return float(done.stdout.strip())


def time_generation(model: ChargenModel, context: int, chars: int, seed: int) -> dict[str, float]:
    """Single-stream generation after a ``context``-character prompt.

    ``chars_per_s`` counts this process's CPU time, not the wall clock: with one
    ONNX Runtime thread the two agree on an idle machine, but only CPU time stays
    meaningful while other jobs share the cores.  ``chars_per_s_wall`` is the
    wall-clock figure; ``first_char_s`` is prompt encoding plus the first character.
    """
    m = measure_speed(model, context, chars, seed)
    return {
        "first_char_s": m["first_char_s"],
        "chars_per_s": m["chars_per_s_cpu"],
        "chars_per_s_wall": m["chars_per_s"],
    }


def _loadavg() -> float | None:
    """1-minute load average, recorded next to timings (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def measure_model(
    path: str | Path,
    precision: str,
    encoded_dir: str | Path,
    sample: SampleParams,
    compare: CompareParams,
) -> dict[str, Any]:
    """Every metric of the ``precision`` model at ``path``; keys as in ``metrics/<precision>.json``."""
    model = ChargenModel.load(path, threads=compare.threads)
    if model.precision != precision:
        raise CompareError(
            f"{path} holds a {model.precision} model, not {precision}; re-run the export and quantize stages"
        )
    total, n = model.score(read_split(encoded_dir, "test"))
    loss = summarize(total, n)
    rate = spelling_rate(samples(model, sample), training_words(encoded_dir))

    # Best of several timings: other processes only ever make a run slower.
    long = [time_generation(model, compare.long_context, compare.timed_chars, r) for r in range(compare.repeats)]
    short = [time_generation(model, 1, compare.timed_chars, r) for r in range(compare.repeats)]
    return {
        "precision": model.precision,
        "test_loss": loss["loss"],
        "test_bpc": loss["bpc"],
        "test_perplexity": loss["perplexity"],
        "test_tokens": loss["tokens"],
        "spelling_rate": rate,
        "size_bytes": Path(path).stat().st_size,
        "chars_per_s": max(m["chars_per_s"] for m in long),
        "chars_per_s_wall": max(m["chars_per_s_wall"] for m in long),
        # Right after a 1-character prompt: equal to chars_per_s when the cache keeps
        # the per-character cost independent of how much came before.
        "chars_per_s_short_context": max(m["chars_per_s"] for m in short),
        "first_char_s": min(m["first_char_s"] for m in long),
        "peak_rss_mb": peak_rss_mb(path, compare.threads, compare.long_context, compare.timed_chars),
        "threads": compare.threads,
        "long_context": compare.long_context,
        "timed_chars": compare.timed_chars,
        "loadavg_1m": _loadavg(),
    }


def read_metrics(path: str | Path) -> dict[str, Any]:
    m = read_object(path, CompareError, "metrics", "run the compare stage for both precisions (dvc repro)")
    missing = [k for k in REPORTED if not isinstance(m.get(k), int | float)]
    if missing:
        raise CompareError(f"{path}: lacks {missing[0]}; re-run the compare stage")
    return m


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and math.isfinite(a / b) else None


def report(fp32: dict[str, Any], int8: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``metrics/compare.json`` (int8 minus fp32, int8 over fp32) and the plot's rows."""
    summary = {
        "int8_minus_fp32": {k: int8[k] - fp32[k] for k in REPORTED},
        "int8_over_fp32": {k: _ratio(int8[k], fp32[k]) for k in REPORTED},
    }
    # One bar per metric and precision, relative to fp32 (= 1), so different units share an axis.
    rows = [
        {
            "metric": f"{label} ({name})",
            "precision": name,
            "value": m[key],
            "relative_to_fp32": _ratio(m[key], fp32[key]),
        }
        for key, label in PLOTTED.items()
        for name, m in (("fp32", fp32), ("int8", int8))
    ]
    return summary, rows
