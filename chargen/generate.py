"""Sampling text from an exported model, one token per step, with the KV cache.

The prompt is encoded once; each step feeds one new token per sample and the keys
and values of everything before it (the graph's ``present`` outputs fed back as the
next ``past``), so every token costs the same however much came before. Shapes:
B samples, H heads, P cached tokens, D head size, V vocabulary, W context length.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Iterator

import numpy as np

from chargen.decoder import RopeDecoder
from chargen.model import ChargenModel
from chargen.sampling import check_sampling, sample_next, sample_one

# A sample also ends after this many tokens per requested character, so a run that
# keeps drawing tokens that add no text (end-of-text with stop_at_eot off) still ends.
MAX_TOKENS_PER_CHAR = 4


def check_seed(seed: int | None) -> None:
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def generate_ids(
    model: ChargenModel,
    prompt_ids: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    num_samples: int = 1,
) -> Iterator[np.ndarray]:
    """Endless sampling: yields the next token id of every sample, (B,) int64, per step.
    The unknown token is never sampled.

    The context slides once it is full: rotary models keep the last W - 1 cached
    keys/values and keep counting positions (only relative offsets matter);
    learned-position models re-encode the last W tokens at positions 0..W-1.
    """
    check_sampling(temperature, top_k, top_p)
    check_seed(seed)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    # Python's Mersenne Twister rather than numpy.random: importing the latter costs
    # ~20 ms of start-up, and B uniforms per step are cheap either way.
    rng = random.Random(seed)
    B, W, n = num_samples, model.block_size, model.prev_ids
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    if prompt.size == 0:
        prompt = np.array([model.tokenizer.eot_id], dtype=np.int64)
    # The last W ids are encoded; the n before them ("no token" before the prompt's start)
    # are what an n-gram graph reads as their context.
    T = min(W, prompt.size)
    known = np.concatenate([model.no_prev_ids(1)[0], prompt])  # (n + N,)
    ids, before = known[-T:], known[len(known) - T - n : len(known) - T]  # (T,), (n,)
    # The prompt is encoded once for all samples and its cache copied B times.
    logits, present = model.forward(ids[None, :], np.arange(T, dtype=np.int64)[None, :], model.empty_past(1),
                                    before[None, :] if n else None)
    last = np.repeat(logits[:, -1, :], B, axis=0)  # (B, V)
    past = [np.repeat(p, B, axis=0) for p in present]  # (B, H, T, D) each
    if model.config.pos_encoding == "rope":
        prev = np.repeat(known[None, len(known) - n :], B, axis=0) if n else None  # (B, n): the last n ids
        steps = _rope_steps(model, past, T, prev)
    else:
        steps = _learned_steps(model, past, T, np.tile(np.concatenate([before, ids]), (B, 1)))
    next(steps)  # prime the coroutine
    single = B == 1 and top_k == 0 and top_p >= 1.0  # the common case: one stream, plain sampling
    unk = model.tokenizer.unk_id
    while True:
        if unk is not None:
            # The unknown token stands for "some rare character": printing U+FFFD helps
            # nobody, so it is never sampled.
            last[:, unk] = -np.inf
        if single:
            nxt = np.array([sample_one(last[0], rng.random(), temperature)])  # (1,)
        else:
            u = np.array([rng.random() for _ in range(B)])  # (B,)
            nxt = sample_next(last, u, temperature, top_k, top_p)  # (B,)
        yield nxt
        last = steps.send(nxt)


def _rope_steps(
    model: ChargenModel, past: list[np.ndarray], pos: int, prev: np.ndarray | None
) -> Generator[np.ndarray | None, np.ndarray, None]:
    """Coroutine: receives the new ids (B,), returns the next logits (B, V). ``prev``
    (B, n) holds the n ids before the next new one, for a graph that reads them."""
    decoder = RopeDecoder(model, past, pos, prev)
    last = None
    while True:
        last = decoder.step((yield last))


def _learned_steps(
    model: ChargenModel, past: list[np.ndarray], pos: int, history: np.ndarray
) -> Generator[np.ndarray | None, np.ndarray, None]:
    """Coroutine for learned positions: cached steps until position W-1, then the
    last W tokens (B, W) are re-encoded each step at positions 0..W-1. ``history``
    (B, n + T) starts with the n ids before the encoded prompt (its n-gram context)."""
    B, W, n = history.shape[0], model.block_size, model.prev_ids
    full_positions = np.broadcast_to(np.arange(W, dtype=np.int64), (B, W)).copy()  # (B, W)
    empty = model.empty_past(B)
    last = None
    while True:
        nxt = yield last
        history = np.concatenate([history, nxt[:, None]], axis=1)[:, -(W + n):]  # (B, <= n + W)
        if pos < W:
            prev = np.ascontiguousarray(history[:, -1 - n : -1]) if n else None  # (B, n)
            logits, past = model.forward(nxt[:, None], np.full((B, 1), pos, np.int64), past, prev)
            pos += 1
        else:
            prev = np.ascontiguousarray(history[:, -W - n : -W]) if n else None  # (B, n)
            logits, _ = model.forward(np.ascontiguousarray(history[:, -W:]), full_positions, empty, prev)
        last = logits[:, -1, :]


def generate(
    model: ChargenModel,
    prompt: str,
    max_new_chars: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    num_samples: int = 1,
    stop_at_eot: bool = True,
    new_document: bool = False,
) -> Iterator[list[str]]:
    """Yield, step by step, the new text of every sample (B strings, "" where a step
    completed no character), at most ``max_new_chars`` characters per sample.

    A token that ends inside a multi-byte character is held back until the character
    is complete. With ``stop_at_eot`` a sample ends at the end-of-text token;
    generation ends when every sample has ended. With ``new_document`` the prompt starts a
    new document (a new record of an arithmetic model): the model sees end-of-text before it.
    """
    if max_new_chars < 0:
        raise ValueError(f"max_new_chars must be >= 0, got {max_new_chars}")
    if max_new_chars == 0:
        return
    ids = model.encode(prompt)
    if new_document and prompt:  # the end-of-text token first, as before every document but the first in training
        ids = np.concatenate(([model.tokenizer.eot_id], ids))
    steps = generate_ids(model, ids, temperature, top_k, top_p, seed, num_samples)
    decoders = [model.tokenizer.stream() for _ in range(num_samples)]
    left = [max_new_chars] * num_samples  # characters each sample may still add
    eot = model.tokenizer.eot_id
    for _ in range(MAX_TOKENS_PER_CHAR * max_new_chars):
        new = next(steps).tolist()
        texts = []
        for b, token in enumerate(new):
            if not left[b]:
                texts.append("")
                continue
            ended = stop_at_eot and token == eot
            text = (decoders[b].flush() if ended else decoders[b].push(token))[: left[b]]
            left[b] = 0 if ended else left[b] - len(text)
            texts.append(text)
        yield texts
        if not any(left):
            return
