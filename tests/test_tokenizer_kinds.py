"""Byte and BPE models end to end: the pipeline's tiny model of each kind trains, exports
through its parity check, is measured by the compare stage and generates through the CLI;
a token that ends inside a character is held back until the character is complete, and
lengths and speeds count characters, not tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KIND_TEXT, run_stage_script, tiny_config
from test_cli import chargen

from chargen.generate import generate, generate_ids
from chargen.model import ChargenModel
from chargen.scoring import score, scored_chars
from chargen.speed import measure_speed
from chargen.tokenizers import ByteTokenizer, Tokenizer
from pipeline.export.model_file import export_onnx
from pipeline.model import GPT

# ---------------------------------------------------------------------------- a model that spells "€€€…"


def cycle_model(tokenizer: Tokenizer, cycle: list[int], path: Path) -> Path:
    """An exported model whose next token after ``cycle[i]`` is ``cycle[i + 1]`` (after any
    other token: ``cycle[0]``), whatever came before: the blocks' output projections are
    zero, so the logits depend on the last token's embedding alone, a one-hot state."""
    cfg = tiny_config(tokenizer.size, block_size=8, n_layer=1, n_head=1, n_embd=8, bias=True, tie_weights=False)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.wte.weight.zero_()
        model.wte.weight[:, 0] = 1.0  # state 0: any token outside the cycle
        model.lm_head.weight.zero_()
        model.lm_head.weight[cycle[0], 0] = 100.0
        for state, token in enumerate(cycle, start=1):
            model.wte.weight[token] = torch.nn.functional.one_hot(torch.tensor(state), cfg.n_embd).float()
            model.lm_head.weight[cycle[state % len(cycle)], state] = 100.0
    export_onnx(model, tokenizer, path, {})
    return path


@pytest.fixture(scope="module")
def euro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte model that writes euro signs, each the three tokens E2 82 AC."""
    tokenizer = ByteTokenizer()
    return cycle_model(tokenizer, list("€".encode()), tmp_path_factory.mktemp("euro") / "model.fp32.onnx")


def test_a_character_split_across_tokens_streams_once_complete(euro_model) -> None:
    m = ChargenModel.load(euro_model)
    steps = list(generate(m, "a", 5, seed=0, stop_at_eot=False))
    assert steps == [[""], [""], ["€"]] * 5  # nothing is printed until the character's last byte
    ids = generate_ids(m, m.encode("a"), seed=0)
    assert [int(next(ids)[0]) for _ in range(6)] == list("€€".encode())


def test_max_new_chars_counts_characters_through_the_cli(euro_model) -> None:
    r = chargen("generate", "a", "-n", "7", "--no-stop-at-eot", "--seed", "1", "--model", str(euro_model))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "€" * 7


def test_speed_counts_characters_not_tokens(euro_model) -> None:
    speed = measure_speed(ChargenModel.load(euro_model), context_tokens=5, timed_chars=30)
    # the first euro sign ends the time to the first character; then 30 signs are 90 tokens
    assert speed["tokens_per_s"] / speed["chars_per_s"] == pytest.approx(3.0)


# ---------------------------------------------------------------------------- the pipeline's tiny models


def test_each_kind_trains_exports_generates_and_is_measured_in_characters(kind_models, tmp_path) -> None:
    """One test per kind, so that each tiny pipeline is built once per test worker."""
    # trained, evaluated per character, exported within the parity bound
    assert kind_models.parity_error <= 1e-4
    m = ChargenModel.load(kind_models.fp32)
    assert m.tokenizer == kind_models.tokenizer and m.tokenizer.kind == kind_models.kind
    metrics = json.loads((kind_models.project / "metrics" / "eval.json").read_text())
    assert m.metrics == metrics  # the evaluation travels in the model file
    assert metrics["test_chars"] != metrics["test_tokens"]
    assert metrics["test_nats_per_char"] == pytest.approx(
        metrics["test_loss"] * metrics["test_tokens"] / metrics["test_chars"])
    assert metrics["context_chars"] == pytest.approx(m.block_size * metrics["test_chars"] / metrics["test_tokens"])
    curve = (kind_models.project / "dvclive" / "plots" / "metrics" / "val" / "bpc.tsv").read_text().splitlines()
    assert float(curve[-1].split("\t")[-1]) < float(curve[1].split("\t")[-1])  # it learned

    # the CLI: lengths in characters, losses per character, the kind and size shown
    for path in (kind_models.fp32, kind_models.int8):
        r = chargen("generate", "the cat", "-n", "40", "--no-stop-at-eot", "--seed", "3", "--model", str(path))
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert len(r.stdout) == 40  # characters, however many tokens they took
    text = KIND_TEXT[-300:]
    (tmp_path / "sample.txt").write_text(text, encoding="utf-8")
    r = chargen("eval", str(tmp_path / "sample.txt"), "--json", "--model", str(kind_models.fp32))
    assert r.returncode == 0, r.stderr
    (result,) = json.loads(r.stdout)["results"]
    ids = m.tokenizer.encode(text)
    total, n = score(m, ids)
    assert result["tokens"] == n and result["chars"] == len(text) - len(m.tokenizer.decode(ids[:1]))
    assert result["nats_per_char"] == pytest.approx(total / result["chars"], rel=1e-6)
    info = chargen("info", "--model", str(kind_models.int8))
    assert f"tokenizer:      {kind_models.kind}, {m.tokenizer.size} tokens" in info.stdout
    assert f"context_length: {m.block_size} tokens" in info.stdout and "context_chars:" in info.stdout

    # the compare stage: test loss per character, speed in characters
    project = tmp_path / "project"
    shutil.copytree(kind_models.project, project)
    params = (project / "params.yaml").read_text(encoding="utf-8")
    (project / "params.yaml").write_text(params.replace(str(kind_models.project), str(project)), encoding="utf-8")
    done = run_stage_script("compare", project, "--precision", "int8")
    assert done.returncode == 0, done.stderr
    measured = json.loads((project / "metrics" / "int8.json").read_text())
    test_ids = np.fromfile(project / "data" / "encoded" / "test.bin", dtype=np.uint16)
    assert measured["test_tokens"] == len(test_ids) - 1
    assert measured["test_chars"] == scored_chars(test_ids, kind_models.tokenizer.chars_per_token())
    assert measured["test_nats_per_char"] == pytest.approx(
        measured["test_loss"] * measured["test_tokens"] / measured["test_chars"])
    assert measured["chars_per_s"] > 0 and measured["tokens_per_s_wall"] > 0
