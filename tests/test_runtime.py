"""The ONNX Runtime inference library: loading, KV-cached generation, scoring, sampling.

Generation is checked against the PyTorch model's own cached sampler (greedy, so
both pick the same tokens), past the end of the context window, for rotary and
learned positions alike.
"""

from __future__ import annotations

import json
import math
import random
import threading

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_config
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from chargen import contract
from chargen.errors import ModelError
from chargen.generate import generate, generate_ids
from chargen.model import ChargenModel
from chargen.sampling import check_sampling, next_token_probs, sample_next, sample_one
from chargen.scoring import score, score_batches, score_stream, token_nll
from chargen.speed import measure_speed
from chargen.tokenizers import CharTokenizer
from pipeline.export.model_file import export_onnx
from pipeline.model import GPT

LETTERS = "abcdefghijklmnopqrstuvwxyz "


def letters_tokenizer() -> CharTokenizer:
    return CharTokenizer(["<|endoftext|>", "<|unk|>", *sorted(LETTERS)])


@pytest.fixture(scope="session")
def learned_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, ChargenModel]:
    """A random learned-position GPT with a short window, made confident (large
    embeddings) so greedy decoding has clear winners."""
    tokenizer = letters_tokenizer()
    torch.manual_seed(3)
    cfg = tiny_config(tokenizer.size, block_size=12, n_head=2, n_embd=16, pos_encoding="learned")
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.wte.weight.mul_(100.0)
        model.wte.weight[1].zero_()  # the unknown token (never sampled) must not win either
    path = tmp_path_factory.mktemp("learned") / "model.fp32.onnx"
    export_onnx(model, tokenizer, path, {"val_loss": 1.5}, atol=1e-3)
    return model, ChargenModel.load(path)


@pytest.fixture(scope="session", params=["rope", "learned"])
def ngram_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, ChargenModel]:
    """A random GPT with bigram and trigram tables that decide most of the next token,
    so a wrong previous id in the runtime changes the greedy text."""
    tokenizer = letters_tokenizer()
    torch.manual_seed(4)
    cfg = tiny_config(tokenizer.size, block_size=12, n_head=2, n_embd=16, pos_encoding=request.param,
                      bigram=True, trigram_buckets=61, logit_cap=30.0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.ngram.bigram.weight.normal_(std=3.0)
        model.ngram.trigram.weight.normal_(std=3.0)
        model.wte.weight.mul_(30.0)
        model.wte.weight[1].zero_()
    path = tmp_path_factory.mktemp(f"ngram-{request.param}") / "model.fp32.onnx"
    export_onnx(model, tokenizer, path, {"val_loss": 1.5}, atol=1e-3)
    return model, ChargenModel.load(path)


def torch_greedy(model: GPT, prompt: np.ndarray, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt)[None, :], n, top_k=1)  # (1, n)
    return out[0].tolist()


def onnx_greedy(m: ChargenModel, prompt: np.ndarray, n: int, num_samples: int = 1) -> list[int]:
    steps = generate_ids(m, prompt, top_k=1, seed=0, num_samples=num_samples)
    ids = np.stack([next(steps) for _ in range(n)], axis=1)  # (B, n)
    assert (ids == ids[:1]).all()  # greedy: every sample of the batch is the same
    return ids[0].tolist()


# ---------------------------------------------------------------------------- loading


def test_load_exposes_metadata(tiny_models) -> None:
    for path, precision in ((tiny_models.fp32, "fp32"), (tiny_models.int8, "int8")):
        m = ChargenModel.load(path)
        assert m.precision == precision
        assert m.tokenizer == tiny_models.tokenizer
        assert m.config_dict == {**tiny_models.model.cfg.to_dict(), "num_params": tiny_models.model.num_params()}
        assert m.block_size == tiny_models.model.cfg.block_size
        assert m.num_params == tiny_models.model.num_params()
        assert m.metrics["step"] == 0


def edited_model(tiny_models, tmp_path, **meta_edits) -> str:
    """The tiny fp32 model with some chargen metadata replaced; values are JSON-dumped
    unless they are strings."""
    proto = onnx.load(str(tiny_models.fp32))
    for prop in proto.metadata_props:
        key = prop.key.removeprefix("chargen.")
        if key in meta_edits:
            value = meta_edits[key]
            prop.value = value if isinstance(value, str) else json.dumps(value)
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    return str(path)


def config_with(tiny_models, **changes) -> dict:
    return {**tiny_models.model.cfg.to_dict(), "num_params": 1, **changes}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: {"config": config_with(t, vocab_size=t.model.cfg.vocab_size + 3)}, "vocabulary size"),
    (lambda t: {"config": config_with(t, n_head=1)}, "n_head 1 but the graph has 2"),
    (lambda t: {"config": config_with(t, n_head=0)}, "n_head must be a positive integer"),
    (lambda t: {"config": config_with(t, n_head=3)}, "not a multiple of n_head"),
    (lambda t: {"config": config_with(t, n_layer=3)}, "lacks past_key_values.2.key"),
    (lambda t: {"config": config_with(t, n_layer=1)}, "unexpected inputs past_key_values.1"),
    (lambda t: {"config": config_with(t, block_size=0)}, "block_size must be a positive integer"),
    (lambda t: {"config": config_with(t, pos_encoding="alibi")}, "pos_encoding"),
    (lambda t: {"config": "[1, 2]"}, "config is not a JSON object"),
    (lambda t: {"metrics": "[1]"}, "metrics is not a JSON object"),
    (lambda t: {"tokenizer": {**t.tokenizer.describe(), "tokens": t.tokenizer.tokens[:-2]}}, "tokenizer has"),
    (lambda t: {"tokenizer": {**t.tokenizer.describe(), "kind": "bpe9"}}, "kind 'bpe9'"),
    (lambda t: {"tokenizer": "not json"}, "malformed"),
])
def test_metadata_that_disagrees_with_the_graph_is_a_model_error(tiny_models, tmp_path, edit, message) -> None:
    path = edited_model(tiny_models, tmp_path, **edit(tiny_models))
    with pytest.raises(ModelError, match=message) as e:
        ChargenModel.load(path)
    assert "re-export" in str(e.value) or "upgrade" in str(e.value)


def test_graph_inputs_follow_the_contract(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.int8)
    L = m.config.n_layer
    assert m.prev_ids == 2  # the tiny model has the default n-gram tables
    assert [i.name for i in m.session.get_inputs()] == contract.input_names(L, prev_ids=True)
    assert [o.name for o in m.session.get_outputs()] == contract.output_names(L)
    assert contract.past_names(2)[:2] == ["past_key_values.0.key", "past_key_values.0.value"]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_forward_writes_the_new_entries_into_the_cache_in_place(tiny_models, precision) -> None:
    """Two new tokens from slot 4 of a 5-slot cache land in slots 4 and 0 (the ring wraps);
    every other slot keeps what it held, and the logits equal a chronological cache's."""
    m = ChargenModel.load(getattr(tiny_models, precision))
    ids, pos = np.array([[3, 4, 5, 6]]), np.arange(4)[None, :]
    plain = m.new_cache(1, 4)
    want = m.forward(ids, pos, plain)  # slots 0..3 in order
    ring = m.new_cache(1, 5)
    marker = [np.full_like(c, 7.0) for c in ring]
    for c, mk in zip(ring, marker, strict=True):
        c[:] = mk
    first = m.forward(ids[:, :2], pos[:, :2], ring, 2, mask=contract.causal_mask(2, 2, 5) & (np.arange(5) >= 2))
    # The first two tokens in slots 2 and 3; then the other two from slot 4: slots 4 and 0.
    mask = np.array([[False, False, True, True, True], [True, False, True, True, True]])
    second = m.forward(ids[:, 2:], pos[:, 2:], ring, 4, prev_ids=ids[:, :2], mask=mask)
    atol = 1e-5 if precision == "fp32" else 0.1  # int8 quantizes each call's activations at its own scale
    for c, p, mk in zip(ring, plain, marker, strict=True):
        assert np.abs(c[:, :, [2, 3, 4, 0]] - p).max() < atol  # (B, H, 4, D): where each token went
        assert np.array_equal(c[:, :, 1], mk[:, :, 1])  # untouched
    got = np.concatenate([first, second], axis=1)  # (1, 4, V) logits of about +-5
    assert np.abs(got - want).max() < (1e-5 if precision == "fp32" else 0.25)


def test_missing_and_directory_paths_are_model_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        ChargenModel.load(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="directory"):
        ChargenModel.load(tmp_path)


def test_truncated_file_is_a_model_error(tiny_models, tmp_path) -> None:
    data = tiny_models.int8.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        ChargenModel.load(bad)


def test_a_model_newer_than_onnx_runtime_says_to_upgrade(tiny_models, tmp_path) -> None:
    proto = onnx.load(str(tiny_models.fp32))
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99
    path = tmp_path / "future.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match=r"uses ONNX opset 99, which ONNX Runtime .* cannot run; upgrade it"):
        ChargenModel.load(path)


def test_onnx_without_chargen_metadata_is_rejected(tiny_models, tmp_path) -> None:
    proto = onnx.load(str(tiny_models.fp32))
    del proto.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(proto, str(plain))
    with pytest.raises(ModelError, match="not a chargen model"):
        ChargenModel.load(plain)


def test_unknown_format_version_is_rejected(tiny_models, tmp_path) -> None:
    proto = onnx.load(str(tiny_models.fp32))
    for p in proto.metadata_props:
        if p.key == "chargen.format":
            p.value = "99"
    future = tmp_path / "future.onnx"
    onnx.save(proto, str(future))
    with pytest.raises(ModelError, match="format '99'.*re-export it"):
        ChargenModel.load(future)


# ---------------------------------------------------------------------------- generation


def test_rope_greedy_matches_torch_past_the_context(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.fp32)
    W = m.block_size
    prompt = m.encode("the cat sat")
    assert onnx_greedy(m, prompt, 3 * W, num_samples=3) == torch_greedy(tiny_models.model, prompt, 3 * W)


def test_rope_prompt_longer_than_context(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.fp32)
    prompt = m.encode(tiny_models.text[: 2 * m.block_size + 5])
    assert onnx_greedy(m, prompt, 20) == torch_greedy(tiny_models.model, prompt, 20)


def test_learned_positions_greedy_matches_torch_past_the_context(learned_model) -> None:
    model, m = learned_model
    W = m.block_size
    for text in ("ab", "hello world the"):  # shorter than, and longer than, the window
        prompt = m.encode(text)
        assert onnx_greedy(m, prompt, 3 * W, num_samples=2) == torch_greedy(model, prompt, 3 * W)


def test_ngram_greedy_matches_torch_past_the_context(ngram_model) -> None:
    """The runtime feeds every step the two ids before it, as the model saw them in training."""
    model, m = ngram_model
    W = m.block_size
    assert m.prev_ids == 2
    for text in ("a", "ab", "hello world the cat"):  # fewer ids than the n-gram context, and past the window
        prompt = m.encode(text)
        assert onnx_greedy(m, prompt, 3 * W, num_samples=2) == torch_greedy(model, prompt, 3 * W)


def test_ngram_score_matches_torch(ngram_model) -> None:
    from pipeline.evaluation.evaluate import split_loss

    model, m = ngram_model
    ids = m.encode("the quick brown fox jumps over the lazy dog " * 3)
    total, n = score(m, ids)
    want = split_loss(model, ids, m.tokenizer.chars_per_token(), 4, torch.device("cpu"))
    assert n == want["tokens"]
    assert math.isclose(total / n, want["loss"], rel_tol=1e-4)


def test_same_seed_same_text_other_seed_other_text(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.int8)

    def text(seed: int) -> str:
        return "".join(c[0] for c in generate(m, "the ", 60, temperature=1.0, seed=seed, stop_at_eot=False))

    assert text(5) == text(5)
    assert text(5) != text(6)


def test_single_stream_draws_what_the_batch_sampler_draws(tiny_models) -> None:
    """One stream takes the fast path (sample_one); with the same seed it must pick
    exactly what a plain loop over forward + sample_next picks."""
    m = ChargenModel.load(tiny_models.fp32)
    prompt = m.encode("the ")
    n = m.block_size - len(prompt)  # the whole window, before it starts to slide
    steps = generate_ids(m, prompt, temperature=0.7, seed=11)
    got = [int(next(steps)[0]) for _ in range(n)]

    rng, want = random.Random(11), []
    cache = m.new_cache(1, m.block_size)  # chronological: slot i holds position i
    logits = m.forward(prompt[None, :], np.arange(len(prompt))[None, :], cache)
    text = prompt.tolist()
    for pos in range(len(prompt), len(prompt) + n):
        last = logits[:, -1, :].copy()
        last[:, m.tokenizer.unk_id] = -np.inf
        nxt = sample_next(last, np.array([rng.random()]), temperature=0.7)
        want.append(int(nxt[0]))
        prev = np.array([text[-m.prev_ids:]])  # (1, n): the ids before the new one
        text.append(int(nxt[0]))
        logits = m.forward(nxt[:, None], np.array([[pos]]), cache, pos, prev)
    assert got == want


def test_batched_samples_step_together_and_differ(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.int8)
    steps = list(generate(m, "the ", 50, temperature=1.5, seed=1, num_samples=4, stop_at_eot=False))
    assert all(len(s) == 4 for s in steps)
    samples = ["".join(s[i] for s in steps) for i in range(4)]
    assert [len(t) for t in samples] == [50] * 4  # characters, however many steps that took
    assert len(set(samples)) == 4
    chars = set(tiny_models.tokenizer.tokens[2:])  # never the end-of-text or unknown token
    assert set("".join(samples)) <= chars


def test_max_new_chars_zero_yields_nothing(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.int8)
    assert list(generate(m, "the", 0)) == []


def test_bad_sampling_settings_raise(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.int8)
    with pytest.raises(ValueError, match="temperature"):
        next(generate(m, "a", 5, temperature=0.0))
    with pytest.raises(ValueError, match="temperature"):
        next(generate(m, "a", 5, temperature=math.inf))
    with pytest.raises(ValueError, match="top_p"):
        next(generate(m, "a", 5, top_p=1.5))
    with pytest.raises(ValueError, match="seed"):
        next(generate(m, "a", 5, seed=-1))


def test_speed_measurement_reports_positive_numbers(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.int8)
    r = measure_speed(m, context_tokens=3 * m.block_size, timed_chars=20)
    assert r["first_char_s"] > 0 and r["chars_per_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["chars_per_s"], rel=0.1)  # one token per character


# ---------------------------------------------------------------------------- scoring


def test_score_matches_torch_with_the_shared_windows(tiny_models) -> None:
    m = ChargenModel.load(tiny_models.fp32)
    ids = m.tokenizer.encode(tiny_models.text[:300])
    total, n = score(m, ids, batch_size=3)
    assert n == len(ids) - 1
    want = 0.0
    with torch.no_grad():
        for x, y, mask in score_batches(ids, m.block_size, batch_size=8):
            logits = tiny_models.model(torch.from_numpy(x))[0].numpy()
            want += float(token_nll(logits, y)[mask].sum())
    assert total == pytest.approx(want, rel=1e-4)
    # A trained model beats the uniform guess on its own text.
    assert total / n < math.log(m.vocab_size)


def test_batches_scored_side_by_side_give_the_same_totals(tiny_models) -> None:
    """Several worker threads sum the same per-batch losses in the same order: equal to the
    last bit, for two models at once, with a piece boundary inside a window."""
    models = [ChargenModel.load(path, threads=1) for path in (tiny_models.fp32, tiny_models.int8)]
    ids = models[0].tokenizer.encode(tiny_models.text[:1500])
    pieces = lambda: [ids[:700], ids[700:]]  # noqa: E731
    alone = score_stream(models, pieces(), batch_size=2)
    assert score_stream(models, pieces(), batch_size=2, workers=3) == alone
    assert alone[0][1] == len(ids) - 1
    with pytest.raises(ValueError, match="workers"):
        score_stream(models, pieces(), workers=0)


def test_an_error_in_the_text_stops_scoring_side_by_side(tiny_models) -> None:
    """A failure while reading the text reaches the caller; nothing is left running."""
    m = ChargenModel.load(tiny_models.int8, threads=1)
    ids = m.tokenizer.encode(tiny_models.text[:1500])

    def pieces():
        yield ids
        raise OSError("read failed")

    with pytest.raises(OSError, match="read failed"):
        score_stream([m], pieces(), batch_size=1, workers=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("chargen-score")]


def test_int8_score_is_close_to_fp32(tiny_models) -> None:
    ids = tiny_models.tokenizer.encode(tiny_models.text[:200])
    fp32 = score(ChargenModel.load(tiny_models.fp32), ids)
    int8 = score(ChargenModel.load(tiny_models.int8), ids)
    assert int8[1] == fp32[1]
    assert abs(int8[0] / int8[1] - fp32[0] / fp32[1]) < 0.1


# ---------------------------------------------------------------------------- sampling


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = np.array([[0.1, 2.0, 1.9, -1.0], [3.0, 0.0, 2.9, 1.0]])
    u = np.array([0.999, 0.999])
    assert sample_next(logits, u, top_k=1).tolist() == [1, 0]
    assert sample_next(logits, u, top_p=1e-6).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = np.log(np.array([[0.2, 0.5, 0.3]]))
    p = next_token_probs(logits, top_p=0.7)
    assert p[0].tolist() == pytest.approx([0.0, 0.5 / 0.8, 0.3 / 0.8])
    p = next_token_probs(logits, top_p=0.85)  # 0.5 + 0.3 falls short: the 0.2 token stays
    assert p[0].tolist() == pytest.approx([0.2, 0.5, 0.3])


def test_top_k_keeps_k_tokens_and_temperature_sharpens() -> None:
    logits = np.array([[1.0, 2.0, 3.0, 4.0]])
    assert (next_token_probs(logits, top_k=2)[0] > 0).tolist() == [False, False, True, True]
    cold, hot = next_token_probs(logits, 0.5), next_token_probs(logits, 2.0)
    assert cold[0, 3] > next_token_probs(logits)[0, 3] > hot[0, 3]


def test_uniforms_invert_the_cdf_and_skip_zero_probability_tokens() -> None:
    logits = np.log(np.array([[0.25, 0.0, 0.75, 0.0]]) + 1e-300)
    assert sample_next(logits, np.array([0.0])).tolist() == [0]
    assert sample_next(logits, np.array([0.3])).tolist() == [2]
    assert sample_next(logits, np.array([0.999999])).tolist() == [2]
    # Drawn frequencies follow the probabilities.
    u = np.random.default_rng(0).random(4000)
    ids = sample_next(np.repeat(logits, 4000, axis=0), u)
    assert set(ids.tolist()) == {0, 2}
    assert abs((ids == 2).mean() - 0.75) < 0.03


@given(
    logits=hnp.arrays(np.float32, st.integers(2, 80), elements=st.floats(-30, 30, width=32)),
    u=st.floats(0, 1, exclude_max=True),
    temperature=st.sampled_from([0.1, 0.8, 1.0, 1.7]),
)
def test_sample_one_is_sample_next_for_one_row(logits, u, temperature) -> None:
    want = sample_next(logits[None, :], np.array([u]), temperature)[0]
    assert sample_one(logits, u, temperature) == want


def test_check_sampling_names_the_bad_setting() -> None:
    check_sampling(0.8, 0, 1.0)
    for args, name in (((0.0, 0, 1.0), "temperature"), ((1.0, -1, 1.0), "top_k"),
                       ((1.0, 0, 0.0), "top_p"), ((1.0, 0, 1.1), "top_p")):
        with pytest.raises(ValueError, match=name):
            check_sampling(*args)
