"""How fast a model generates: single-stream characters per second and time to the first."""

from __future__ import annotations

import random
import time

import numpy as np

from chargen.generate import MAX_TOKENS_PER_CHAR, generate_ids
from chargen.model import ChargenModel


def measure_speed(
    model: ChargenModel, context_tokens: int, timed_chars: int, seed: int = 0, draft: bool = True
) -> dict[str, float]:
    """Single-stream speed with ``context_tokens`` tokens already in context.

    The sampled tokens go through the tokenizer's stream decoder, as the CLI prints
    them, and speeds count the characters that come out: a token may stand for several
    characters or for part of one. Returns ``first_char_s`` (until the first character
    is complete), then over the next ``timed_chars`` characters ``chars_per_s`` and
    ``tokens_per_s`` by the wall clock and ``chars_per_s_cpu`` by this process's CPU
    time, which stays meaningful while other jobs share the cores. The context is
    random ordinary tokens; within a window the model is writing its own text again,
    and with a draft table (``chargen.draft``) how many guesses that text confirms sets
    the speed, as in any generation; ``draft`` False decodes one token per call.
    """
    rng = random.Random(seed)
    tok = model.tokenizer
    specials = {tok.eot_id, tok.unk_id}
    plain = [i for i in range(model.vocab_size) if i not in specials]
    prompt = np.array(rng.choices(plain, k=max(1, context_tokens)), dtype=np.int64)  # (context,)
    decoder = tok.stream()
    budget = MAX_TOKENS_PER_CHAR * (timed_chars + 1)  # a model that only ends documents still stops
    t0 = time.perf_counter()
    steps = generate_ids(model, prompt, seed=seed, draft=draft)
    first = ""
    while not first and budget:
        first = decoder.push(int(next(steps)[0]))
        budget -= 1
    t1, cpu1 = time.perf_counter(), time.process_time()
    chars = tokens = 0
    while chars < timed_chars and budget:
        chars += len(decoder.push(int(next(steps)[0])))
        tokens += 1
        budget -= 1
    t2, cpu2 = time.perf_counter(), time.process_time()
    return {
        "first_char_s": t1 - t0,
        "chars_per_s": chars / max(t2 - t1, 1e-9),
        "chars_per_s_cpu": chars / max(cpu2 - cpu1, 1e-9),
        "tokens_per_s": tokens / max(t2 - t1, 1e-9),
    }
