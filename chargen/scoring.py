"""Measuring loss: how a long token array is cut into windows, and scoring them with an
exported model (numpy only).

Every loss measurement of the project (the torch evaluate stage, the ONNX compare
stage, ``chargen eval``) goes through these windows, so their numbers are comparable.

The rule: windows of ``block_size`` inputs advance by ``stride`` (default
``block_size // 2``). Token ``t`` (for t >= 1) is predicted from the tokens before it
and is scored exactly once, in the first window that contains it as a target, so
after the first window every scored token has at least ``block_size - stride``
tokens of context. Token 0 has no context and is never scored, so an array of N
tokens yields N - 1 scored targets.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from chargen.model import ChargenModel


@dataclass(frozen=True)
class Window:
    """Inputs ``ids[start:start+length]``, targets ``ids[start+1:start+1+length]``.

    Only targets at offsets ``>= score_from`` inside the window count; earlier ones
    were scored by a previous window.
    """

    start: int
    length: int
    score_from: int


def _next_window(scored: int, n_targets: int, block_size: int, stride: int) -> Window:
    """The window after targets 1..scored are done, in an array of n_targets targets."""
    end = min(_wanted_end(scored, block_size, stride), n_targets)  # score scored+1..end
    start = max(0, end - block_size)
    return Window(start, end - start, scored - start)


def _wanted_end(scored: int, block_size: int, stride: int) -> int:
    """The last target of the next window when the array goes on long enough."""
    return block_size if scored == 0 else scored + stride


def _stride(block_size: int, stride: int | None) -> int:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    stride = max(1, block_size // 2) if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size], got {stride}")
    return stride


def score_windows(n_tokens: int, block_size: int, stride: int | None = None) -> list[Window]:
    """The windows that score targets 1..n_tokens-1 exactly once each."""
    stride = _stride(block_size, stride)
    windows, scored = [], 0  # targets at positions 1..scored are done
    while scored < n_tokens - 1:
        windows.append(_next_window(scored, n_tokens - 1, block_size, stride))
        scored = windows[-1].start + windows[-1].length
    return windows


def stream_windows(
    chunks: Iterable[np.ndarray], block_size: int, stride: int | None = None
) -> Iterator[tuple[Window, np.ndarray]]:
    """``score_windows`` of the concatenated chunks, with each window's ids (length + 1,),
    without holding more than the current chunk and one window of the array before it.

    A window is emitted as soon as its last target has arrived, except those that depend
    on where the array ends, which wait for the end.
    """
    stride = _stride(block_size, stride)
    buf, base, scored = np.zeros(0, dtype=np.int64), 0, 0  # buf[i] is token base + i
    for chunk in chunks:
        buf = np.concatenate([buf, np.asarray(chunk, dtype=np.int64)])
        last = base + buf.size - 1  # the last target that has arrived
        while _wanted_end(scored, block_size, stride) <= last:
            w = _next_window(scored, last, block_size, stride)
            yield w, buf[w.start - base : w.start - base + w.length + 1]
            scored = w.start + w.length
        keep = max(base, scored - block_size)  # every later window starts after this
        buf, base = buf[keep - base :], keep
    n_targets = base + buf.size - 1
    while scored < n_targets:
        w = _next_window(scored, n_targets, block_size, stride)
        yield w, buf[w.start - base : w.start - base + w.length + 1]
        scored = w.start + w.length


def stream_batches(
    chunks: Iterable[np.ndarray], block_size: int, batch_size: int, stride: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(x, y, mask)``: int64 (B, L) inputs and targets, bool (B, L) scored, for
    the windows of the concatenated chunks; memory is bounded by the batch and the chunk.

    Windows of equal length are batched together (all of them are ``block_size``
    long unless the array is shorter than ``block_size + 1``).
    """
    batch: list[tuple[Window, np.ndarray]] = []

    def emit() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.stack([ids[:-1] for _, ids in batch])  # (B, L)
        y = np.stack([ids[1:] for _, ids in batch])  # (B, L)
        mask = np.arange(x.shape[1])[None, :] >= np.array([w.score_from for w, _ in batch])[:, None]  # (B, L)
        return x, y, mask

    for w, ids in stream_windows(chunks, block_size, stride):
        if batch and (len(batch) == batch_size or w.length != batch[0][0].length):
            yield emit()
            batch = []
        batch.append((w, ids))
    if batch:
        yield emit()


def score_batches(
    ids: np.ndarray, block_size: int, batch_size: int, stride: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``stream_batches`` of one token array (N,)."""
    return stream_batches([np.asarray(ids)], block_size, batch_size, stride)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood in nats of each target: logits (..., V), targets (...) -> (...)."""
    logits = logits.astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)  # (..., 1) for a stable log-sum-exp
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]  # (...)
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (...)
    return lse - picked


def scored_chars(ids: np.ndarray, chars_per_token: np.ndarray) -> int:
    """Characters that the scored targets of ``ids`` stand for: every token but the first
    (:func:`score_windows`), counted with ``Tokenizer.chars_per_token()``."""
    return int(chars_per_token[np.asarray(ids)[1:]].sum())


def summarize(total_nats: float, n_tokens: int, n_chars: int) -> dict[str, float | int]:
    """Loss in nats per token (the model's own loss), nats and bits per character, and
    perplexity per token, from the total loss of ``n_tokens`` scored tokens that stand
    for ``n_chars`` characters. Per character = per token x tokens / characters, so
    models with different tokenizers compare; with one token per character the two agree."""
    if n_tokens <= 0 or n_chars <= 0:
        raise ValueError("nothing was scored: the token array needs at least 2 tokens")
    loss = total_nats / n_tokens
    per_char = total_nats / n_chars
    return {
        "loss": loss,
        "nats_per_char": per_char,
        "bpc": per_char / float(np.log(2.0)),
        "perplexity": float(np.exp(loss)),
        "tokens": n_tokens,
        "chars": n_chars,
    }


# Windows per session call: 8 scored 300,000 characters of the corpus faster than 4, 16
# or 32 did as one call across both cores (int8: 60,600 chars/s against 56,700, 55,100
# and 45,400); two calls side by side, 1 MB took 16.4 s at 8, 15.8-17.0 s at 4 and
# 16.9-17.6 s at 16. The cache the graph writes grows with the batch.
BATCH_SIZE = 8


def score(model: ChargenModel, ids: np.ndarray, batch_size: int = BATCH_SIZE) -> tuple[float, int]:
    """(total_nats, n_scored) of a token array (N,) under an exported model."""
    return score_stream([model], [np.asarray(ids)], batch_size)[0]


def score_stream(
    models: Sequence[ChargenModel], chunks: Iterable[np.ndarray], batch_size: int = BATCH_SIZE,
    workers: int = 1,
) -> list[tuple[float, int]]:
    """(total_nats, n_scored) per model of the concatenated token chunks, read once: each
    batch of windows goes through every model, so memory is bounded by the batch and the
    chunk, not the text. The models must share one context length (one set of windows).

    ``workers`` > 1 scores that many batches at once, each on its own thread (give the
    models one intra-op thread each): independent calls keep the cores busier than one
    call split across them. The totals are the same, added in the same order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    block_size = models[0].block_size
    if any(m.block_size != block_size for m in models):
        raise ValueError("the models have different context lengths; score them separately")
    batches = stream_batches(chunks, block_size, batch_size)
    if workers == 1:
        caches: dict[tuple[int, int, int], list[np.ndarray]] = {}
        scored = (_batch_nats(models, batch, caches) for batch in batches)
    else:
        scored = _concurrent(models, batches, workers)
    totals, n = [0.0] * len(models), 0
    for nats, count in scored:
        totals = [total + x for total, x in zip(totals, nats, strict=True)]
        n += count
    return [(total, n) for total in totals]


def _batch_nats(
    models: Sequence[ChargenModel], batch: tuple[np.ndarray, np.ndarray, np.ndarray],
    caches: dict[tuple[int, int, int], list[np.ndarray]],
) -> tuple[list[float], int]:
    """Each model's total loss on one batch ``(x, y, mask)`` of ``stream_batches``, and the
    number of targets it scores. ``caches`` holds a cache per model and window shape,
    reused: each call rewrites every slot."""
    x, y, mask = batch  # (B, L) each
    positions = np.broadcast_to(np.arange(x.shape[1], dtype=np.int64), x.shape).copy()
    nats = []
    for i, model in enumerate(models):
        key = (i, *x.shape)
        if key not in caches:
            caches[key] = model.new_cache(*x.shape)  # (B, H, L, D) each
        logits = model.forward(x, positions, caches[key])  # (B, L, V)
        nats.append(float(token_nll(logits[mask], y[mask]).sum()))  # only the scored targets
    return nats, int(mask.sum())


def _concurrent(
    models: Sequence[ChargenModel], batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], workers: int,
) -> Iterator[tuple[list[float], int]]:
    """``_batch_nats`` of each batch, in order, ``workers`` of them scored at once on a
    thread pool (ONNX Runtime releases the GIL during a call), each thread with caches of
    its own. At most 2 x ``workers`` batches are held at a time."""
    local = threading.local()

    def job(batch: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[list[float], int]:
        if not hasattr(local, "caches"):
            local.caches = {}
        return _batch_nats(models, batch, local.caches)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="chargen-score")
    pending: deque[Future[tuple[list[float], int]]] = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(job, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the caller stops early: drop what has not started
        pool.shutdown(wait=True, cancel_futures=True)
