"""How fast a model generates: single-stream characters per second and time to the first."""

from __future__ import annotations

import random
import time

import numpy as np

from chargen.generate import generate_ids
from chargen.model import ChargenModel


def measure_speed(
    model: ChargenModel, context_tokens: int, timed_tokens: int, seed: int = 0
) -> dict[str, float]:
    """Single-stream speed with ``context_tokens`` tokens already in context.

    Returns ``first_char_s`` (prompt encoding plus the first sampled token) and
    ``chars_per_s`` over the next ``timed_tokens`` tokens, by the wall clock, and
    ``chars_per_s_cpu`` by this process's CPU time, which stays meaningful while
    other jobs share the cores. The context is random ordinary tokens: speed does
    not depend on what the text says.
    """
    rng = random.Random(seed)
    tok = model.tokenizer
    specials = {tok.eot_id, tok.unk_id}
    plain = [i for i in range(model.vocab_size) if i not in specials]
    prompt = np.array(rng.choices(plain, k=max(1, context_tokens)), dtype=np.int64)  # (context,)
    t0 = time.perf_counter()
    steps = generate_ids(model, prompt, seed=seed)
    next(steps)
    t1, cpu1 = time.perf_counter(), time.process_time()
    for _ in range(timed_tokens):
        next(steps)
    t2, cpu2 = time.perf_counter(), time.process_time()
    return {
        "first_char_s": t1 - t0,
        "chars_per_s": timed_tokens / max(t2 - t1, 1e-9),
        "chars_per_s_cpu": timed_tokens / max(cpu2 - cpu1, 1e-9),
    }
