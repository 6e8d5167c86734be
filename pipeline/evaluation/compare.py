"""Measuring an exported model with ONNX Runtime, as users run it: the compare stage.

Every precision is measured the same way, on the same data, through the same
runtime the CLI uses (``chargen``): test loss over the whole test split
(the windows of ``chargen.scoring``, so it is comparable with the evaluate stage),
the spelling rate of samples drawn with the ``sample`` params, the exact-match
accuracy of greedy answers to held-out arithmetic problems (when the corpus has them), file size,
single-stream generation speed with a long context, time to the first character
and the peak memory of a process that loads the model and generates.

No torch here: this measures the ONNX files as users run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from chargen.arithmetic import (
    Problem,
    accuracy_report,
    answer_budget,
    answer_text,
    prompt_ids,
)
from chargen.errors import ChargenError
from chargen.generate import generate, generate_ids
from chargen.model import ChargenModel
from chargen.scoring import score, scored_chars, summarize
from chargen.speed import measure_speed
from chargen.spelling import LONG_WORD, spelling_rate
from pipeline.evaluation.arithmetic import heldout_problems, trained_digits
from pipeline.evaluation.words import training_words
from pipeline.params import CompareParams, SampleParams
from pipeline.tokens.splits import read_scored_split


class CompareError(ChargenError):
    """Inputs of the compare or report stage are missing or unusable."""


def greedy_answers(model: ChargenModel, problems: list[Problem]) -> list[str | None]:
    """Every problem answered by an exported model through the runtime's sampler with
    top-k 1 (greedy), as ``chargen generate PROMPT --top-k 1 --new-document`` answers it."""
    answers: list[str | None] = []
    for problem in problems:
        steps = generate_ids(model, prompt_ids(problem, model.tokenizer), top_k=1, seed=0)
        answers.append(answer_text([int(next(steps)[0]) for _ in range(answer_budget([problem]))], model.tokenizer))
    return answers


def samples(model: ChargenModel, sample: SampleParams) -> list[str]:
    """``sample.num_samples`` continuations of the prompt, ``sample.chars`` characters each."""
    texts = [""] * sample.num_samples
    steps = generate(
        model, sample.prompt, sample.chars, temperature=sample.temperature, top_k=sample.top_k,
        seed=sample.seed, num_samples=sample.num_samples, stop_at_eot=False,
    )
    for chars in steps:
        texts = [t + c for t, c in zip(texts, chars, strict=True)]
    return texts


# A fresh interpreter that only loads the model and generates: its peak RSS is the
# memory a user's `chargen generate` needs, free of this process's test data.
_RSS_PROBE = """
import resource, sys
from chargen.model import ChargenModel
from chargen.speed import measure_speed
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
    """Single-stream generation of ``chars`` characters after a ``context``-token prompt.

    ``chars_per_s`` counts this process's CPU time, not the wall clock: with one
    ONNX Runtime thread the two agree on an idle machine, but only CPU time stays
    meaningful while other jobs share the cores.  ``chars_per_s_wall`` is the
    wall-clock figure; ``first_char_s`` is prompt encoding until the first character.
    """
    m = measure_speed(model, context, chars, seed)
    return {
        "first_char_s": m["first_char_s"],
        "chars_per_s": m["chars_per_s_cpu"],
        "chars_per_s_wall": m["chars_per_s"],
        "tokens_per_s_wall": m["tokens_per_s"],
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
    ids = read_scored_split(encoded_dir, model.tokenizer)
    total, n = score(model, ids)
    loss = summarize(total, n, scored_chars(ids, model.tokenizer.chars_per_token()))
    texts, words = samples(model, sample), training_words(encoded_dir)

    problems = heldout_problems(encoded_dir)
    arithmetic = {}
    if problems:
        answers = greedy_answers(model, problems)
        arithmetic = {"arithmetic": accuracy_report(problems, answers, trained_digits(encoded_dir))}

    # Best of several timings: other processes only ever make a run slower.
    long = [time_generation(model, compare.long_context, compare.timed_chars, r) for r in range(compare.repeats)]
    short = [time_generation(model, 1, compare.timed_chars, r) for r in range(compare.repeats)]
    return {
        "precision": model.precision,
        "test_loss": loss["loss"],  # nats per token
        "test_nats_per_char": loss["nats_per_char"],
        "test_bpc": loss["bpc"],
        "test_perplexity": loss["perplexity"],
        "test_tokens": loss["tokens"],
        "test_chars": loss["chars"],
        "spelling_rate": spelling_rate(texts, words),
        "spelling_rate_4plus": spelling_rate(texts, words, min_letters=LONG_WORD),
        "size_bytes": Path(path).stat().st_size,
        "chars_per_s": max(m["chars_per_s"] for m in long),
        "chars_per_s_wall": max(m["chars_per_s_wall"] for m in long),
        "tokens_per_s_wall": max(m["tokens_per_s_wall"] for m in long),
        # Right after a 1-character prompt: equal to chars_per_s when the cache keeps
        # the per-character cost independent of how much came before.
        "chars_per_s_short_context": max(m["chars_per_s"] for m in short),
        "first_char_s": min(m["first_char_s"] for m in long),
        "peak_rss_mb": peak_rss_mb(path, compare.threads, compare.long_context, compare.timed_chars),
        "threads": compare.threads,
        "long_context": compare.long_context,
        "timed_chars": compare.timed_chars,
        "loadavg_1m": _loadavg(),
        **arithmetic,
    }
