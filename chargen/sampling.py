"""Choosing the next token from logits: temperature, top-k and top-p (numpy only).

The caller supplies one uniform number per sample and step (from a seeded
generator), so the same seed always gives the same text.
"""

from __future__ import annotations

import math

import numpy as np

from chargen.contract import MIN_TEMPERATURE


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the first out-of-range sampling setting."""
    if not (temperature >= MIN_TEMPERATURE and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g}, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token_probs(
    logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
    """Sampling distribution (B, V) float64 from logits (B, V) after temperature, top-k, top-p."""
    x = logits.astype(np.float64) / temperature  # (B, V)
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = np.partition(x, V - top_k, axis=-1)[:, V - top_k, None]  # (B, 1) k-th largest
        x = np.where(x < kth, -np.inf, x)  # ties with the k-th may keep a few more
    x -= x.max(axis=-1, keepdims=True)
    p = np.exp(x)  # (B, V)
    p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)  # (B, V) most likely first
        sorted_p = np.take_along_axis(p, order, axis=-1)  # (B, V)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass
        # before it is still short of top_p (so the most likely token always stays).
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < top_p  # (B, V)
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def _plain_cdf(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Unnormalised cdf along the last axis of logits (..., V) at ``temperature``, float64.

    The common case, on the per-character hot path: unnormalised weights give the
    same draw as probabilities (callers scale u by the total), with fewer array passes.
    """
    x = logits.astype(np.float64)  # (..., V)
    x -= x.max(axis=-1, keepdims=True)
    if temperature != 1.0:
        x /= temperature
    return np.exp(x, out=x).cumsum(axis=-1)  # (..., V)


def sample_next(
    logits: np.ndarray,
    uniforms: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """Draw one token id per row by inverting the CDF at ``uniforms`` (B,) in [0, 1):
    logits (B, V) -> ids (B,) int64."""
    if top_k == 0 and top_p >= 1.0:
        cdf = _plain_cdf(logits, temperature)  # (B, V)
    else:
        cdf = np.cumsum(next_token_probs(logits, temperature, top_k, top_p), axis=-1)  # (B, V)
    u = np.asarray(uniforms, dtype=np.float64)[:, None] * cdf[:, -1:]  # (B, 1), scaled so rounding can't overshoot
    # First index whose cdf exceeds u; zero-probability tokens never qualify.
    ids = (cdf <= u).sum(axis=-1)  # (B,)
    return np.minimum(ids, cdf.shape[-1] - 1).astype(np.int64)


def sample_one(logits: np.ndarray, u: float, temperature: float = 1.0) -> int:
    """``sample_next`` for a single row (V,) without top-k or top-p: one stream's hot path.

    Both build the cdf with ``_plain_cdf``, so the same uniform draws the same id;
    this only skips the batch bookkeeping, which at one character per call
    costs more than the maths.
    """
    cdf = _plain_cdf(logits, temperature)  # (V,)
    # Entries <= u (scaled like sample_next's) = the first index whose cdf exceeds it.
    return min(int(cdf.searchsorted(u * cdf[-1], side="right")), cdf.size - 1)
