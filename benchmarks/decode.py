"""Decoding and scoring speed of exported models through the runtime alone (no torch).

For each model file: single-stream chars/s after ``--context`` tokens of context (the
compare stage's measurement, ``chargen.speed.measure_speed``: median and best of
``--repeats`` runs by the wall clock, and the compare stage's figure, the best per
CPU-second), also without the file's draft table when it has one, with the tokens per
call; and the total chars/s of ``--num-samples`` samples generated together the way
``chargen generate --num-samples`` does (through the stream decoders). With
``--breakdown``, the parts of one step; with ``--eval-file``, ``chargen eval``'s scoring
chars/s of that text, and with ``--agreement`` too, how far drafted decoding agrees
with one token per call (first differing token per seed, total variation of the rows).
Generation runs on ``--threads`` intra-op threads (one by default, as the speed bars
are stated). Prints one JSON object, e.g.
    python -m benchmarks.decode --models models/model.int8.onnx models/model.fp32.onnx --breakdown
    python -m benchmarks.decode --num-samples 0 --eval-file text.txt --eval-threads 0 --agreement
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from typing import Any

import numpy as np
import onnxruntime

from benchmarks.options import (
    MODEL_FILE,
    int_at_least,
    non_negative_int,
    positive_int,
    require_file,
)
from chargen.decoder import RopeDecoder
from chargen.errors import ChargenError
from chargen.generate import generate, generate_ids
from chargen.model import ChargenModel
from chargen.sampling import next_token_probs, sample_one
from chargen.scoring import BATCH_SIZE, score_stream
from chargen.speed import measure_speed
from pipeline.stage import run_stage


def single_stream(m: ChargenModel, context: int, chars: int, repeats: int, draft: bool = True) -> dict[str, float]:
    measure_speed(m, context, 20, draft=draft)  # warm-up: the first runs allocate ONNX Runtime's buffers
    runs = [measure_speed(m, context, chars, seed=r, draft=draft) for r in range(repeats)]
    wall = [r["chars_per_s"] for r in runs]
    # chars_per_s_cpu_best is the compare stage's figure: best of the runs, per CPU-second.
    return {"chars_per_s_median": statistics.median(wall), "chars_per_s_best": max(wall),
            "chars_per_s_cpu_best": max(r["chars_per_s_cpu"] for r in runs)}


class CountingSession:
    """A model's session that counts the calls going through it."""

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        self.session, self.calls = session, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run(self, *args: Any, **kwargs: Any) -> list:
        self.calls += 1
        return self.session.run(*args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        self.session.run_with_iobinding(*args, **kwargs)


def tokens_per_call(m: ChargenModel, context: int, tokens: int, seeds: int = 5) -> float:
    """Tokens drawn per session call by one stream after ``context`` tokens (the draft
    table's guesses that held, plus one), over ``seeds`` generations."""
    session, total = m.session, 0
    try:
        for seed in range(seeds):
            prompt = np.random.default_rng(seed).integers(2, m.vocab_size, size=context)
            steps = generate_ids(m, prompt, seed=seed)
            next(steps)  # the prompt's call
            m.session = counting = CountingSession(session)
            for _ in range(tokens):
                next(steps)
            total += counting.calls
    finally:
        m.session = session
    return seeds * tokens / total


def step_breakdown(m: ChargenModel, steps: int = 2000) -> dict[str, float]:
    """Microseconds per single-stream step with the window full, by part: one
    ``ChargenModel.forward`` call (the cache bound afresh each call), the same graph
    run through the ring of ``chargen.decoder`` bound once, a call of three new tokens
    (the drawn one and two guesses) keeping one, drawing a token (repeated, and right
    after such a call, when the CPU caches hold the session's data), and the whole step
    per token of ``generate_ids`` (with the file's draft table, several tokens share a
    call)."""
    W, k = m.block_size, m.prev_ids
    prompt = np.random.default_rng(0).integers(2, m.vocab_size, size=W)
    cache = m.new_cache(1, W)  # (1, H, W, D) each: the full window
    m.forward(prompt[None, :], np.arange(W)[None, :], cache, 0, m.no_prev_ids(1))
    ids, pos, prev = np.array([[5]]), np.array([[W]]), np.full((1, k), 5) if k else None
    one = RopeDecoder(m, cache, W, None if prev is None else prev.copy())
    three_at_once = RopeDecoder(m, cache, W, prev, max_feed=3)
    logits = one.step(np.array([5]))[0].copy()  # (V,)
    three = np.array([[5, 6, 7]])
    rng = random.Random(0)

    def three_tokens() -> np.ndarray:
        rows = three_at_once.feed(three)  # (1, 3, V)
        three_at_once.keep(1)
        return rows

    def per_step(fn) -> float:
        for _ in range(steps // 10):
            fn()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps * 1e6

    generated = generate_ids(m, prompt, seed=0)
    for _ in range(W):
        next(generated)  # the window is full from here on
    return {
        "forward_call_us": per_step(lambda: m.forward(ids, pos, cache, W - 1, prev)),
        "bound_cache_step_us": per_step(lambda: one.step(ids[0])),
        "three_token_call_us": per_step(three_tokens),
        "draw_after_three_token_call_us": per_step(lambda: sample_one(three_tokens()[0, 0], rng.random()))
        - per_step(three_tokens),
        "sample_us": per_step(lambda: sample_one(logits, rng.random())),
        "whole_step_us": per_step(lambda: next(generated)),
    }


def batched(m: ChargenModel, num_samples: int, context: int, chars: int, repeats: int) -> dict[str, float]:
    """Total chars/s of ``num_samples`` samples generated in one batch, window full."""
    rng = random.Random(0)
    letters = [c for c in m.tokenizer.decode(np.arange(m.vocab_size)) if c.isalpha()]
    prompt = "".join(rng.choices(letters, k=context))
    runs = []
    for r in range(repeats + 1):
        steps = generate(m, prompt, chars, seed=r, num_samples=num_samples, stop_at_eot=False)
        next(steps)  # the prompt's forward pass is start-up, not throughput
        t0, done = time.perf_counter(), 0
        for texts in steps:
            done += sum(len(t) for t in texts)
        if r:  # the first run is a warm-up
            runs.append(done / (time.perf_counter() - t0))
    return {"total_chars_per_s_median": statistics.median(runs), "total_chars_per_s_best": max(runs)}


def draft_agreement(m: ChargenModel, text_ids: np.ndarray, tokens: int, seeds: int = 5) -> dict:
    """How far drafted decoding agrees with one token per call. For ``seeds`` seeds, the
    first token at which the two generations from one prompt differ (None: all ``tokens``
    agree); and over positions of ``text_ids`` (window full), the total variation between
    a three-token call's rows and the same tokens fed one by one."""
    prompt = m.encode("Once upon a time,")
    firsts = []
    for seed in range(seeds):
        a, b = generate_ids(m, prompt, seed=seed), generate_ids(m, prompt, seed=seed, draft=False)
        pairs = ((int(next(a)[0]), int(next(b)[0])) for _ in range(tokens))
        firsts.append(next((i for i, (x, y) in enumerate(pairs) if x != y), None))
    W, n = m.block_size, m.prev_ids
    cache = m.new_cache(1, W)  # (1, H, W, D) each
    m.forward(text_ids[None, :W], np.arange(W)[None, :], cache)
    prev = text_ids[None, W - n : W] if n else None  # (1, n): the ids before the next one
    one = RopeDecoder(m, cache, W, None if prev is None else prev.copy())
    many = RopeDecoder(m, cache, W, prev, max_feed=3)
    tv = []
    for t in range(W, W + 3 * (tokens // 3), 3):
        fed = text_ids[None, t : t + 3]  # (1, 3)
        rows = many.feed(fed)[0].copy()  # (3, V)
        many.keep(3)
        singles = np.stack([one.step(fed[:, i])[0].copy() for i in range(3)])  # (3, V)
        p, q = next_token_probs(rows), next_token_probs(singles)  # (3, V) each
        tv += (np.abs(p - q).sum(axis=-1) / 2).tolist()
    return {"first_difference": firsts, "row_total_variation_mean": float(np.mean(tv)),
            "row_total_variation_max": float(np.max(tv)), "positions": len(tv)}


def scoring(m: ChargenModel, path: str, batch_size: int, workers: int) -> dict[str, float]:
    """``chargen eval``'s scoring of a text file, ``workers`` batches at once on a model of
    one intra-op thread: chars/s including encoding, and the loss."""
    t0 = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        ids = m.tokenizer.encode(f.read())
    [(total, n)] = score_stream([m], [ids], batch_size, workers)
    seconds = time.perf_counter() - t0
    return {"chars_per_s": ids.size / seconds, "seconds": seconds, "loss": total / n, "tokens": int(ids.size)}


def check_text(path: str) -> None:
    """A ChargenError unless ``path`` is a UTF-8 text file (read before any timing)."""
    try:
        require_file(path, "--eval-file", "a UTF-8 text file").read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChargenError(f"--eval-file: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["models/model.int8.onnx"])
    ap.add_argument("--threads", type=non_negative_int, default=1, help="intra-op threads (0: one per core)")
    ap.add_argument("--context", type=positive_int, default=1000, help="tokens in context before the timing")
    ap.add_argument("--chars", type=positive_int, default=2000, help="characters timed per single-stream run")
    ap.add_argument("--repeats", type=positive_int, default=10, help="runs per timing (the compare stage's 10)")
    ap.add_argument("--num-samples", type=non_negative_int, default=32,
                    help="batch size of the batched timing (0: skip)")
    ap.add_argument("--batch-chars", type=positive_int, default=200,
                    help="characters per sample in the batched timing")
    ap.add_argument("--breakdown", action="store_true", help="also time the parts of one step")
    ap.add_argument("--eval-file", help="also time scoring this UTF-8 text")
    ap.add_argument("--eval-threads", type=non_negative_int,
                    help="batches scored at once, one intra-op thread each (default: --threads; 0: one per core)")
    ap.add_argument("--eval-batch-size", type=positive_int, default=BATCH_SIZE)
    ap.add_argument("--agreement", action="store_true",
                    help="with --eval-file: how far drafted decoding agrees with one token per call")
    ap.add_argument("--agreement-tokens", type=int_at_least(3), default=2000,
                    help="tokens per seed and positions compared (compared three at a time)")
    a = ap.parse_args()
    if a.eval_file:
        check_text(a.eval_file)
    # Every file opens before any timing: a bad one is reported at once, not after the others ran.
    models = {path: ChargenModel.load(require_file(path, "--models", MODEL_FILE), threads=a.threads)
              for path in a.models}

    result: dict = {"onnxruntime": onnxruntime.__version__, "threads": a.threads,
                    "loadavg_before": os.getloadavg()[0], "models": {}}
    for path, m in models.items():
        row: dict = {"precision": m.precision, "draft_table": m.draft is not None,
                     "single_stream": single_stream(m, a.context, a.chars, a.repeats)}
        if m.draft is not None:  # the same runs one token per call, for comparison
            row["single_stream_without_draft"] = single_stream(m, a.context, a.chars, a.repeats, draft=False)
            row["tokens_per_call"] = tokens_per_call(m, a.context, a.chars)
        if a.breakdown and m.config.pos_encoding == "rope":
            row["step_breakdown"] = step_breakdown(m)
        if a.num_samples:
            row[f"batch_{a.num_samples}"] = batched(m, a.num_samples, a.context, a.batch_chars, a.repeats)
        if a.agreement and m.draft is not None and a.eval_file:
            with open(a.eval_file, encoding="utf-8") as f:
                text_ids = m.tokenizer.encode(f.read(m.block_size * 20 + a.agreement_tokens * 4))
            row["draft_agreement"] = draft_agreement(m, text_ids, a.agreement_tokens)
        if a.eval_file:
            threads = (a.threads if a.eval_threads is None else a.eval_threads) or os.cpu_count() or 1
            scorer = ChargenModel.load(path, threads=1)
            row["eval"] = {"threads": threads, **scoring(scorer, a.eval_file, a.eval_batch_size, threads)}
        result["models"][path] = row
    result["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_stage(main)
