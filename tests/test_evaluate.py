"""The evaluate stage, the scoring windows and the spelling rate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_stage_script, tiny_config, tiny_tokenizer, write_encoded
from hypothesis import given
from hypothesis import strategies as st

from chargen.scoring import score_batches, score_windows, stream_windows, summarize, token_nll
from chargen.spelling import counted_words, spelling_rate, words_of
from chargen.tokenizers import EOT_TOKEN, UNK_TOKEN, ByteTokenizer, CharTokenizer
from pipeline.evaluation.evaluate import split_loss
from pipeline.evaluation.words import training_words
from pipeline.model import GPT
from pipeline.tokens import bpe_train

# ----------------------------------------------------------------------------- scoring


@given(n=st.integers(0, 600), block=st.integers(1, 64), data=st.data())
def test_every_target_is_scored_exactly_once(n: int, block: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, block))
    hits = np.zeros(n, dtype=int)
    for w in score_windows(n, block, stride):
        assert 1 <= w.length <= block and w.start >= 0 and w.start + w.length <= n - 1
        hits[w.start + 1 + w.score_from : w.start + 1 + w.length] += 1
    assert (hits[1:] == 1).all() and (n == 0 or hits[0] == 0)


@given(n=st.integers(0, 400), block=st.integers(1, 40), data=st.data())
def test_streamed_windows_are_the_windows_of_the_whole_array(n: int, block: int, data: st.DataObject) -> None:
    """However the array arrives in chunks, the stream yields score_windows' windows with
    their ids, and holds no more than the chunk and a window of what came before."""
    stride = data.draw(st.integers(1, block))
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=8)))
    ids = np.random.default_rng(n).integers(0, 50, n)
    chunks = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    streamed = list(stream_windows(iter(chunks), block, stride))
    assert [w for w, _ in streamed] == score_windows(n, block, stride)
    for w, window_ids in streamed:
        np.testing.assert_array_equal(window_ids, ids[w.start : w.start + w.length + 1])
        assert window_ids.base is None or window_ids.base.size <= max(map(len, chunks)) + 2 * block + 1


def test_windows_give_context_after_the_first() -> None:
    ws = score_windows(1000, 128)
    assert all(w.length == 128 for w in ws)
    assert all(w.score_from >= 64 for w in ws[1:])  # every later token sees >= 64 earlier ones


def test_score_batches_masks_match_the_windows() -> None:
    ids = np.arange(300) % 7
    batches = list(score_batches(ids, 32, batch_size=4))
    assert sum(int(m.sum()) for _, _, m in batches) == 299
    for x, y, _ in batches:
        assert x.shape == y.shape and x.dtype == np.int64 and x.shape[0] <= 4
        np.testing.assert_array_equal((x + 1) % 7, y)


def test_token_nll_and_summary() -> None:
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    nll = token_nll(logits, np.array([0, 2]))
    np.testing.assert_allclose(nll, [np.log(2), -np.log(0.8)])
    s = summarize(float(nll.sum()), 2, 2)
    assert s["bpc"] == pytest.approx(s["loss"] / np.log(2)) and s["perplexity"] == pytest.approx(np.exp(s["loss"]))


def test_per_character_loss_is_per_token_loss_times_tokens_over_characters() -> None:
    s = summarize(12.0, n_tokens=4, n_chars=10)
    assert s["loss"] == 3.0 and s["nats_per_char"] == pytest.approx(3.0 * 4 / 10)
    assert s["bpc"] == pytest.approx(1.2 / np.log(2)) and s["perplexity"] == pytest.approx(np.exp(3.0))
    assert (s["tokens"], s["chars"]) == (4, 10)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_split_loss_per_character_counts_the_scored_text(kind: str) -> None:
    """Whatever the tokenizer, the characters are those of the text the scored tokens stand
    for (all but the first token), an end-of-text counting as one."""
    text = "le café coûte 3 € — très cher ! 日本の猫。 the cat sat on the mat.\n" * 4
    tokenizer = {"char": lambda: tiny_tokenizer(text), "byte": ByteTokenizer,
                 "bpe": lambda: bpe_train.train([text], 300)}[kind]()
    ids = np.append(tokenizer.encode(text), tokenizer.eot_id)
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    got = split_loss(model, ids, tokenizer.chars_per_token(), batch_size=4, device=torch.device("cpu"))
    first = len(tokenizer.decode(ids[:1]))  # the unscored first token
    assert got["tokens"] == len(ids) - 1 and got["chars"] == len(text) + 1 - first
    assert got["nats_per_char"] == pytest.approx(got["loss"] * got["tokens"] / got["chars"], rel=1e-12)
    if kind == "char":  # one token per character: the two losses are one number
        assert got["nats_per_char"] == got["loss"]
    else:
        assert got["tokens"] != got["chars"]


def test_split_loss_equals_a_brute_force_sum() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(11, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = np.random.default_rng(0).integers(0, 11, 101)
    got = split_loss(model, ids, np.ones(11, dtype=np.int64), batch_size=3, device=torch.device("cpu"))
    total = 0.0
    with torch.no_grad():
        for w in score_windows(len(ids), 16):
            x = torch.from_numpy(ids[w.start : w.start + w.length][None])
            logits, _ = model(x)
            logp = torch.log_softmax(logits[0].double(), -1)
            for j in range(w.score_from, w.length):
                total -= logp[j, ids[w.start + 1 + j]].item()
    assert got["tokens"] == 100
    assert got["loss"] == pytest.approx(total / 100, rel=1e-5)

# ----------------------------------------------------------------------------- spelling


def test_words_and_cut_off_last_word() -> None:
    assert words_of("O'er the hill, 'tis Romeo's 2nd—dog_cat") == ["o'er", "the", "hill", "tis", "romeo's", "nd", "dog", "cat"]
    assert counted_words("the cat sa") == ["the", "cat"]  # "sa" may be a cut-off word
    assert counted_words("the cat sat.") == ["the", "cat", "sat"]


def test_spelling_rate() -> None:
    words = {"the", "cat", "sat"}
    assert spelling_rate(["The cat sta on the mat!"], words) == pytest.approx(3 / 6)
    assert spelling_rate(["the cat ", "sat sat "], words) == 1.0
    assert spelling_rate(["", "!!"], words) == 0.0


def test_spelling_rate_over_long_words_only() -> None:
    words = {"the", "cats", "o'er"}
    text = ["The cats sta on the hill o'er a mat."]
    assert spelling_rate(text, words) == pytest.approx(4 / 9)
    # "o'er" has three letters; of "cats" and "hill" only the first is a word
    assert spelling_rate(text, words, min_letters=4) == pytest.approx(1 / 2)


def test_training_words_come_from_the_train_split_only(tmp_path: Path) -> None:
    write_encoded(tmp_path, tiny_tokenizer(), "the cat sat on the mat " * 20 + "zebra")
    words = training_words(tmp_path)
    assert {"the", "cat", "sat", "mat"} <= words
    assert "zebra" not in words  # it is in the test split


# ----------------------------------------------------------------------------- the stage


@pytest.fixture()
def project(tiny_project: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "project"
    shutil.copytree(tiny_project, dest)
    return dest


def test_evaluate_stage_writes_metrics_and_samples(project: Path) -> None:
    r = run_stage_script("evaluate", project)
    assert r.returncode == 0, r.stderr
    m = json.loads((project / "metrics" / "eval.json").read_text())
    for key in ("test_loss", "test_nats_per_char", "test_bpc", "test_perplexity", "test_chars", "val_loss",
                "val_bpc", "chars_per_token", "context_chars", "spelling_rate",
                "spelling_rate_4plus", "spelling_rate_untrained", "num_params"):
        assert key in m
    test_ids = np.fromfile(project / "data" / "encoded" / "test.bin", dtype=np.uint8)
    assert m["test_tokens"] == len(test_ids) - 1  # the whole split, not a sample
    assert m["test_bpc"] == pytest.approx(m["test_loss"] / np.log(2))  # characters: per token = per char
    assert m["test_nats_per_char"] == m["test_loss"] and m["test_chars"] == m["test_tokens"]
    assert m["context_chars"] == 32 and m["chars_per_token"] == 1.0
    assert 0.0 <= m["spelling_rate"] <= 1.0
    # The trained tiny model spells its repetitive text far better than its initialisation.
    assert m["spelling_rate"] > m["spelling_rate_untrained"]
    assert m["test_loss"] < np.log(tiny_tokenizer().size)  # better than uniform guessing
    md = (project / "reports" / "samples.md").read_text()
    assert "untrained (step 0)" in md and "trained (step 60)" in md
    assert md.count("| sample ") == 2 and md.count("Once upon a time,") >= 4


def test_evaluating_twice_gives_the_same_metrics(project: Path) -> None:
    """Nothing run-to-run variable (times, speeds) goes into the metrics the export embeds."""
    outputs = []
    for _ in range(2):
        assert run_stage_script("evaluate", project).returncode == 0
        outputs.append((project / "metrics" / "eval.json").read_bytes())
    assert outputs[0] == outputs[1]


def test_evaluate_refuses_data_of_another_tokenizer_or_a_damaged_split(project: Path) -> None:
    """Scoring ids of another vocabulary would write wrong metrics without a word."""
    encoded = project / "data" / "encoded"
    tokenizer = CharTokenizer([EOT_TOKEN, UNK_TOKEN, *sorted(set("abc"))])
    good = (encoded / "tokenizer.json").read_bytes()
    (encoded / "tokenizer.json").write_text(json.dumps(tokenizer.describe()), encoding="utf-8")
    r = run_stage_script("evaluate", project)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {Path('data/encoded')} was encoded with another tokenizer than the model's; "
        "re-run the pipeline from the stage that changed (dvc repro)"]
    (encoded / "tokenizer.json").write_bytes(good)
    test = encoded / "test.bin"
    test.write_bytes(test.read_bytes()[:-5])  # truncated
    r = run_stage_script("evaluate", project)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "tokens where meta.json counts" in r.stderr and "dvc repro encode" in r.stderr
    assert not (project / "reports" / "samples.md").exists()


def test_evaluate_without_checkpoint_is_a_clear_error(project: Path) -> None:
    shutil.rmtree(project / "checkpoints")
    r = run_stage_script("evaluate", project)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "train" in r.stderr
    assert not (project / "reports" / "samples.md").exists()


# ----------------------------------------------------------------------------- streamed text


@given(text=st.text(alphabet="ab \r\ne\u0301\u00e9\u0308x\u4e00", max_size=300), piece=st.integers(1, 40))
def test_text_pieces_encode_as_the_whole_text(text: str, piece: int) -> None:
    """CRLF split across reads, combining marks after a cut: the pieces' ids are the whole's."""
    import io

    from chargen.textfile import TextSource

    tok = CharTokenizer([EOT_TOKEN, UNK_TOKEN, *sorted(set("ab \ne\u00e9x"))])
    pieces = list(TextSource(io.BytesIO(text.encode("utf-8")), "t").pieces(piece))
    got = np.concatenate([tok.encode(p) for p in pieces]) if pieces else np.zeros(0, np.int64)
    np.testing.assert_array_equal(got, tok.encode(text))


def test_progress_bar_draws_one_line_and_ends_it() -> None:
    import io

    from chargen.progress import Progress

    out = io.StringIO()
    bar = Progress(2_000_000, "B", out, delay=0, interval=0)
    bar.update(1_000_000, 1_000_000)
    bar.close()
    line = out.getvalue()
    assert line.startswith("\r[###############") and "50.0%" in line and "chars/s" in line and line.endswith("\n")
    quiet = io.StringIO()
    Progress(10, "B", quiet).close()  # a short job draws nothing
    assert quiet.getvalue() == ""
    counter = io.StringIO()
    bar = Progress(None, "B", counter, delay=0, interval=0)  # a pipe: no total, a count instead
    bar.update(0, 2_500_000)
    bar.close()
    assert counter.getvalue().startswith("\r2.50 M chars ") and counter.getvalue().endswith("chars/s\n")
