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

from collections.abc import Iterator
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


def score_windows(n_tokens: int, block_size: int, stride: int | None = None) -> list[Window]:
    """The windows that score targets 1..n_tokens-1 exactly once each."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    stride = max(1, block_size // 2) if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size], got {stride}")
    n_targets = n_tokens - 1
    if n_targets < 1:
        return []
    first = min(block_size, n_targets)
    windows = [Window(0, first, 0)]
    scored = first  # targets at positions 1..scored are done
    while scored < n_targets:
        end = min(scored + stride, n_targets)  # score positions scored+1..end
        start = max(0, end - block_size)
        windows.append(Window(start, end - start, scored - start))
        scored = end
    return windows


def score_batches(
    ids: np.ndarray, block_size: int, batch_size: int, stride: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(x, y, mask)``: int64 (B, L) inputs and targets, bool (B, L) scored.

    Windows of equal length are batched together (all of them are ``block_size``
    long unless the array is shorter than ``block_size + 1``).
    """
    ids = np.asarray(ids)
    batch: list[Window] = []

    def emit(ws: list[Window]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        L = ws[0].length
        x = np.stack([ids[w.start : w.start + L] for w in ws]).astype(np.int64)  # (B, L)
        y = np.stack([ids[w.start + 1 : w.start + 1 + L] for w in ws]).astype(np.int64)  # (B, L)
        mask = np.arange(L)[None, :] >= np.array([w.score_from for w in ws])[:, None]  # (B, L)
        return x, y, mask

    for w in score_windows(len(ids), block_size, stride):
        if batch and (len(batch) == batch_size or w.length != batch[0].length):
            yield emit(batch)
            batch = []
        batch.append(w)
    if batch:
        yield emit(batch)


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


def score(model: ChargenModel, ids: np.ndarray, batch_size: int = 16) -> tuple[float, int]:
    """(total_nats, n_scored) of a token array (N,) under an exported model."""
    total, n = 0.0, 0
    for x, y, mask in score_batches(np.asarray(ids), model.block_size, batch_size):  # (B, L) each
        positions = np.broadcast_to(np.arange(x.shape[1], dtype=np.int64), x.shape).copy()
        logits, _ = model.forward(x, positions, model.empty_past(x.shape[0]))  # (B, L, V)
        nll = token_nll(logits, y)  # (B, L)
        total += float(nll[mask].sum())
        n += int(mask.sum())
    return total, n
