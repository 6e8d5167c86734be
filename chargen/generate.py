"""Sampling text from an exported model, one token per step, with the KV cache.

The prompt is encoded once; each step feeds new tokens, and the graph writes their keys
and values into the cache it attends over, so every token costs the same however much
came before. A single stream feeds the token it drew with the draft table's guesses
after it (``chargen.draft``), several steps per call.
Shapes: B samples, H heads, T prompt tokens, D head size, V vocabulary, W context length.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Iterator

import numpy as np

from chargen.decoder import RopeDecoder
from chargen.draft import NGramDraft
from chargen.model import ChargenModel
from chargen.sampling import check_sampling, sample_next, sample_one

# A sample also ends after this many tokens per requested character, so a run that
# keeps drawing tokens that add no text (end-of-text with stop_at_eot off) still ends.
MAX_TOKENS_PER_CHAR = 4

# Guesses checked per call when the model file has a draft table (chargen.draft): each
# one costs a little more graph arithmetic and is kept with the probability the model
# gives it, so the first few pay and later ones rarely survive.
DRAFT_TOKENS = 2


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
    draft: bool = True,
) -> Iterator[np.ndarray]:
    """Endless sampling: yields the next token id of every sample, (B,) int64, per step.
    The unknown token is never sampled.

    The context slides once it is full: rotary models keep the last W - 1 cached
    keys/values and keep counting positions (only relative offsets matter);
    learned-position models re-encode the last W tokens at positions 0..W-1.
    A single rotary stream whose file has a draft table (``chargen.draft``) checks the
    table's guesses several tokens per call, unless ``draft`` is False: each token is
    still drawn from the model's distribution with the next number of the same random
    stream. In fp32 the text is the same token for token, in fewer calls; int8
    quantizes the activations of one call's tokens together, so its text can part from
    one token per call's (the same seed still gives the same text).
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
    cache = model.new_cache(1, T)  # (1, H, T, D) each
    logits = model.forward(ids[None, :], np.arange(T, dtype=np.int64)[None, :], cache, 0,
                           before[None, :] if n else None)
    last = np.repeat(logits[:, -1, :], B, axis=0)  # (B, V)
    past = [np.repeat(c, B, axis=0) for c in cache]  # (B, H, T, D) each
    draw = _drawer(rng, model.tokenizer.unk_id, B, temperature, top_k, top_p)
    if model.config.pos_encoding == "rope":
        prev = np.repeat(known[None, len(known) - n :], B, axis=0) if n else None  # (B, n): the last n ids
        if draft and B == 1 and model.draft is not None:
            decoder = RopeDecoder(model, past, T, prev, max_feed=1 + DRAFT_TOKENS)
            yield from _drafted(decoder, model.draft, last, draw, prompt.tolist())
            return  # endless: never reached
        steps = _rope_steps(RopeDecoder(model, past, T, prev))
    else:
        steps = _learned_steps(model, past, T, np.tile(np.concatenate([before, ids]), (B, 1)))
    next(steps)  # prime the coroutine
    while True:
        nxt = draw(last)
        yield nxt
        last = steps.send(nxt)


def _drawer(
    rng: random.Random, unk: int | None, B: int, temperature: float, top_k: int, top_p: float
) -> Callable[[np.ndarray], np.ndarray]:
    """The draw of one token per sample from logits (B, V) -> (B,), one uniform each."""
    single = B == 1 and top_k == 0 and top_p >= 1.0  # the common case: one stream, plain sampling

    def draw(last: np.ndarray) -> np.ndarray:
        if unk is not None:
            # The unknown token stands for "some rare character": printing U+FFFD helps
            # nobody, so it is never sampled.
            last[:, unk] = -np.inf
        if single:
            return np.array([sample_one(last[0], rng.random(), temperature)])  # (1,)
        u = np.array([rng.random() for _ in range(B)])  # (B,)
        return sample_next(last, u, temperature, top_k, top_p)  # (B,)

    return draw


def _drafted(
    decoder: RopeDecoder, table: NGramDraft, last: np.ndarray, draw: Callable[[np.ndarray], np.ndarray],
    history: list[int],
) -> Iterator[np.ndarray]:
    """One stream, several tokens per call: each call feeds the token just drawn and the
    table's guesses after it, and keeps the guesses that the model's own draws confirm.

    Row t of a call's logits is the distribution after fed token t, so a draw from it is
    the same draw that feeding the tokens one by one would make, as long as the guesses
    before t were confirmed; the first draw that differs from its guess is the next
    token, and the guesses after it are dropped.
    """
    y = draw(last)  # (1,)
    while True:
        yield y
        history = history[-table.context :] + [int(y[0])]
        guesses = table.propose(history, DRAFT_TOKENS)
        logits = decoder.feed(np.array([[history[-1], *guesses]], dtype=np.int64))  # (1, 1 + k, V)
        kept = 1
        y = draw(logits[:, 0])
        while kept <= len(guesses) and int(y[0]) == guesses[kept - 1]:
            yield y
            history.append(int(y[0]))
            y = draw(logits[:, kept])
            kept += 1
        decoder.keep(kept)


def _rope_steps(decoder: RopeDecoder) -> Generator[np.ndarray | None, np.ndarray, None]:
    """Coroutine: receives the new ids (B,), returns the next logits (B, V)."""
    last = None
    while True:
        last = decoder.step((yield last))


def _learned_steps(
    model: ChargenModel, past: list[np.ndarray], pos: int, history: np.ndarray
) -> Generator[np.ndarray | None, np.ndarray, None]:
    """Coroutine for learned positions: cached steps until position W-1, then the
    last W tokens (B, W) are re-encoded each step at positions 0..W-1. ``past``: the
    prompt's cache (B, H, pos, D) each; ``history`` (B, n + pos) starts with the n ids
    before the encoded prompt (its n-gram context)."""
    B, W, n = history.shape[0], model.block_size, model.prev_ids
    full_positions = np.broadcast_to(np.arange(W, dtype=np.int64), (B, W)).copy()  # (B, W)
    cache = model.new_cache(B, W)  # chronological: slot i holds position i
    for c, p in zip(cache, past, strict=True):
        c[:, :, :pos] = p
    window = model.new_cache(B, W)  # rewritten whole by each re-encoding
    last = None
    while True:
        nxt = yield last
        history = np.concatenate([history, nxt[:, None]], axis=1)[:, -(W + n):]  # (B, <= n + W)
        if pos < W:
            prev = np.ascontiguousarray(history[:, -1 - n : -1]) if n else None  # (B, n)
            logits = model.forward(nxt[:, None], np.full((B, 1), pos, np.int64), cache, pos, prev)
            pos += 1
        else:
            prev = np.ascontiguousarray(history[:, -W - n : -W]) if n else None  # (B, n)
            logits = model.forward(np.ascontiguousarray(history[:, -W:]), full_positions, window, 0, prev)
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
    draft: bool = True,
) -> Iterator[list[str]]:
    """Yield, step by step, the new text of every sample (B strings, "" where a step
    completed no character), at most ``max_new_chars`` characters per sample.

    A token that ends inside a multi-byte character is held back until the character
    is complete. With ``stop_at_eot`` a sample ends at the end-of-text token;
    generation ends when every sample has ended. With ``new_document`` the prompt starts a
    new document (a new record of an arithmetic model): the model sees end-of-text before it.
    ``draft`` False decodes one token per call (``generate_ids``).
    """
    if max_new_chars < 0:
        raise ValueError(f"max_new_chars must be >= 0, got {max_new_chars}")
    if max_new_chars == 0:
        return
    ids = model.encode(prompt)
    if new_document and prompt:  # the end-of-text token first, as before every document but the first in training
        ids = np.concatenate(([model.tokenizer.eot_id], ids))
    steps = generate_ids(model, ids, temperature, top_k, top_p, seed, num_samples, draft)
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
