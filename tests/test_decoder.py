"""The bound-cache decoder (chargen/decoder.py) draws, under a seed, exactly the tokens of a
plain loop of ``ChargenModel.forward`` calls that passes the cache through numpy: one
stream and batches, fp32 and int8, n-gram tables, prompts shorter and longer than the
window, and runs long enough for the window to slide several times. With a draft table
(chargen/draft.py) a single fp32 stream still draws exactly those tokens, in fewer calls;
int8 quantizes the activations of the tokens fed together at one scale, so there each
drafted row is checked to be the single step's distribution within quantization noise."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import tiny_config

from benchmarks.decode import CountingSession, draft_agreement
from chargen.decoder import RopeDecoder
from chargen.generate import generate_ids
from chargen.model import ChargenModel
from chargen.sampling import sample_next, sample_one
from chargen.tokenizers import CharTokenizer
from pipeline.export.draft import build_draft
from pipeline.export.model_file import export_onnx
from pipeline.model import GPT


def plain_loop(m: ChargenModel, prompt: np.ndarray, n: int, temperature: float, top_k: int, top_p: float,
               seed: int, B: int) -> np.ndarray:
    """(B, n) ids: every step one ``forward`` into a chronological cache of W slots whose
    first slots hold the last (at most W - 1) tokens in order; once all W are written,
    every entry moves one slot down, and the oldest drops out."""
    rng, W, k = random.Random(seed), m.block_size, m.prev_ids
    known = np.concatenate([m.no_prev_ids(1)[0], prompt])
    T = min(W, prompt.size)
    ids, before = known[-T:], known[len(known) - T - k : len(known) - T]
    prompt_cache = m.new_cache(1, T)
    logits = m.forward(ids[None, :], np.arange(T)[None, :], prompt_cache, 0, before[None, :] if k else None)
    last = np.repeat(logits[:, -1, :], B, axis=0)  # (B, V)
    count = min(T, W - 1)
    cache = m.new_cache(B, W)
    for c, p in zip(cache, prompt_cache, strict=True):
        c[:, :, :count] = p[:, :, T - count :]
    prev = np.repeat(known[None, len(known) - k :], B, axis=0) if k else None
    pos, out = T, []
    for _ in range(n):
        last[:, m.tokenizer.unk_id] = -np.inf
        if B == 1 and top_k == 0 and top_p == 1.0:
            nxt = np.array([sample_one(last[0], rng.random(), temperature)])
        else:
            nxt = sample_next(last, np.array([rng.random() for _ in range(B)]), temperature, top_k, top_p)
        out.append(nxt)
        logits = m.forward(nxt[:, None], np.full((B, 1), pos), cache, count, prev)  # sees slots 0..count
        prev = np.concatenate([prev[:, 1:], nxt[:, None]], axis=1) if k else None
        pos, count = pos + 1, count + 1
        if count == W:
            for c in cache:
                c[:, :, :-1] = c[:, :, 1:].copy()  # (B, H, W, D): the oldest entry drops out
            count = W - 1
        last = logits[:, -1, :]
    return np.stack(out, axis=1)


@pytest.fixture(scope="module")
def ngram_rope(tmp_path_factory: pytest.TempPathFactory) -> ChargenModel:
    """A random rotary GPT with n-gram tables and a short window."""
    tokenizer = CharTokenizer(["<|endoftext|>", "<|unk|>", *sorted("abcdefgh ")])
    torch.manual_seed(5)
    cfg = tiny_config(tokenizer.size, block_size=10, n_head=2, n_embd=16, bigram=True, trigram_buckets=31)
    path = tmp_path_factory.mktemp("ngram") / "model.fp32.onnx"
    draft = build_draft(tokenizer.encode("abc def gh " * 20), tokenizer.size, context=2, bits=8)
    export_onnx(GPT(cfg).eval(), tokenizer, path, {}, atol=1e-3, draft=draft)
    return ChargenModel.load(path)


@pytest.mark.parametrize(("B", "temperature", "top_k", "top_p"), [
    (1, 1.0, 0, 1.0),  # one stream: sample_one's fast path
    (1, 0.7, 0, 0.9),
    (4, 1.3, 5, 1.0),  # a batch
    (3, 0.8, 0, 1.0),
])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_decoder_draws_what_the_plain_loop_draws(tiny_models, precision, B, temperature, top_k, top_p) -> None:
    m = ChargenModel.load(getattr(tiny_models, precision))
    W = m.block_size
    for text in ("the ", tiny_models.text[: W + 7]):  # shorter and longer than the window
        prompt = m.encode(text)
        steps = generate_ids(m, prompt, temperature, top_k, top_p, seed=3, num_samples=B, draft=False)
        got = np.stack([next(steps) for _ in range(3 * W)], axis=1)  # (B, 3W): the window slides
        assert (got == plain_loop(m, prompt, 3 * W, temperature, top_k, top_p, 3, B)).all()


def test_decoder_with_ngram_tables_draws_what_the_plain_loop_draws(ngram_rope) -> None:
    m = ngram_rope
    for text, B in (("a", 1), ("abc def gh", 2), ("", 3)):
        prompt = m.encode(text)
        steps = generate_ids(m, prompt, temperature=1.0, seed=8, num_samples=B, draft=False)
        got = np.stack([next(steps) for _ in range(40)], axis=1)  # (B, 40): four windows
        assert (got == plain_loop(m, prompt, 40, 1.0, 0, 1.0, 8, B)).all()
        assert len(np.unique(got)) > 3  # the draws are not degenerate


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.5, 1, 1.0)])
def test_drafted_generation_draws_what_the_plain_loop_draws(tiny_models, temperature, top_k, top_p) -> None:
    m = ChargenModel.load(tiny_models.fp32)
    assert m.draft is not None
    W = m.block_size
    for text in ("t", "the ", tiny_models.text[: W + 7]):  # shorter and longer than the window
        prompt = m.encode(text)
        m.session = counting = CountingSession(m.session)
        steps = generate_ids(m, prompt, temperature, top_k, top_p, seed=4)
        got = np.stack([next(steps) for _ in range(4 * W)], axis=1)  # (1, 4W): the window slides
        m.session = counting.session
        assert (got == plain_loop(m, prompt, 4 * W, temperature, top_k, top_p, 4, 1)).all()
        assert counting.calls < 0.8 * 4 * W  # the guesses saved calls


def test_drafted_generation_with_ngram_tables_draws_what_the_plain_loop_draws(ngram_rope) -> None:
    """prev_ids shift by every kept token, however many one call keeps. The random model
    gets a table of its own greedy text, so that its greedy draws confirm many guesses."""
    m = ChargenModel.load(ngram_rope.path)  # its own copy: the table is replaced below
    for text in ("a", "abc def gh abc"):
        prompt = m.encode(text)
        own = plain_loop(m, prompt, 200, 1.0, 1, 1.0, 0, 1)[0]  # (200,) greedy
        m.draft = build_draft(own, m.vocab_size, context=3, bits=10)
        for top_k, temperature in ((1, 1.0), (1, 0.5)):
            m.session = counting = CountingSession(m.session)
            steps = generate_ids(m, prompt, temperature=temperature, top_k=top_k, seed=8)
            got = np.stack([next(steps) for _ in range(60)], axis=1)  # (1, 60): six windows
            m.session = counting.session
            assert (got == plain_loop(m, prompt, 60, temperature, top_k, 1.0, 8, 1)).all()
            assert counting.calls < 40


def test_draft_rows_are_the_single_step_distributions_in_int8(tiny_models) -> None:
    """A multi-token call's row t, once the window is full, is the distribution that
    feeding the tokens one by one gives: each new token sees exactly its own window
    (``draft_agreement`` compares three-token calls with three single steps)."""
    m = ChargenModel.load(tiny_models.int8)
    W = m.block_size
    agreement = draft_agreement(m, m.encode(tiny_models.text[: 3 * W]), tokens=2 * W - 3)
    assert agreement["positions"] >= W
    assert agreement["row_total_variation_max"] < 0.05


def test_a_call_takes_at_most_the_tokens_its_ring_has_room_for(ngram_rope) -> None:
    """The ring holds W - 1 + max_feed slots: a longer call would overwrite entries its own
    first tokens still see, so it is refused; keep() takes 1..T of the tokens fed."""
    m = ngram_rope
    cache = m.new_cache(1, 4)
    m.forward(np.array([[2, 3, 4, 5]]), np.arange(4)[None, :], cache)
    decoder = RopeDecoder(m, cache, 4, np.array([[4, 5]]), max_feed=3)
    assert decoder.slots == m.block_size + 2
    with pytest.raises(ValueError, match="at most 3 tokens per call"):
        decoder.feed(np.array([[2, 3, 4, 5]]))
    decoder.feed(np.array([[2, 3]]))
    with pytest.raises(ValueError, match="keep takes 1..2"):
        decoder.keep(3)
    decoder.keep(2)
    assert decoder.pos == 6 and decoder.prev.tolist() == [[2, 3]]


def test_steps_and_one_token_feeds_mix_on_one_ring(ngram_rope) -> None:
    """step() and feed()/keep() of one token share a binding: mixed on a ring built for
    drafted calls, past several slides, they give the logits of plain steps."""
    m = ngram_rope
    cache = m.new_cache(1, 4)
    m.forward(np.array([[2, 3, 4, 5]]), np.arange(4)[None, :], cache)
    plain = RopeDecoder(m, cache, 4, np.array([[4, 5]]))
    mixed = RopeDecoder(m, cache, 4, np.array([[4, 5]]), max_feed=3)
    for i, token in enumerate(np.random.default_rng(0).integers(2, m.vocab_size, size=5 * m.block_size)):
        want = plain.step(np.array([token])).copy()
        if i % mixed.slots:  # a feed every R tokens: always at the same slot
            got = mixed.step(np.array([token]))
        else:
            got = mixed.feed(np.array([[token]]))[:, 0]
            mixed.keep(1)
        assert np.allclose(got, want, atol=1e-5), i
