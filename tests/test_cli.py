"""The ``chargen`` command line, run as a real subprocess against tiny exported models."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import tiny_config

from chargen import contract
from chargen.tokenizers import CharTokenizer
from pipeline.export.model_file import export_onnx
from pipeline.model import GPT

CONSOLE_SCRIPT = Path(sys.executable).with_name("chargen")
CLI = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "chargen"]
EOT_PROB = 0.1


def chargen(*args: str, cwd: Path | None = None, env: dict | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script (or the module, where it is not installed)."""
    full_env = {k: v for k, v in os.environ.items() if k != "CHARGEN_MODEL"}
    full_env.update(env or {})
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, encoding="utf-8", cwd=cwd,
        env=full_env, input=stdin, timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


def assert_usage_error(result: subprocess.CompletedProcess, option: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert option in result.stderr


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose every step is the same distribution, with end-of-text at EOT_PROB,
    so samples end on their own after about 1 / EOT_PROB characters."""
    letters = "abcdefgh"
    tokenizer = CharTokenizer(["<|endoftext|>", "<|unk|>", *letters])
    cfg = tiny_config(tokenizer.size, block_size=8, n_layer=1, n_head=1, n_embd=8, bias=True, tie_weights=False)
    model = GPT(cfg).eval()
    log_p = [math.log(EOT_PROB), -30.0] + [math.log((1 - EOT_PROB) / len(letters))] * len(letters)
    with torch.no_grad():
        # The final norm outputs the constant e0, so logits are column 0 of lm_head.
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = torch.tensor(log_p)
    path = tmp_path_factory.mktemp("eot") / "model.fp32.onnx"
    export_onnx(model, tokenizer, path, {})
    return path


@pytest.fixture()
def project(tiny_models, tmp_path: Path) -> Path:
    """A project directory with every precision's model where `dvc repro` puts them."""
    (tmp_path / "models").mkdir()
    for precision in contract.PRECISIONS:
        shutil.copy(getattr(tiny_models, precision), contract.model_path(precision, tmp_path / "models"))
    return tmp_path


# ---------------------------------------------------------------------------- generate


def test_generate_continues_the_prompt_from_the_project_models(project: Path, tiny_models) -> None:
    r = chargen("generate", "the cat", "-n", "40", "--seed", "1", cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert 0 < len(r.stdout) <= 40
    assert set(r.stdout) <= set(tiny_models.tokenizer.tokens[2:])
    echoed = chargen("generate", "the cat", "-n", "40", "--seed", "1", "--echo", cwd=project)
    assert echoed.stdout == "the cat" + r.stdout


def test_same_seed_same_text_per_precision(project: Path) -> None:
    def args(seed: int) -> tuple[str, ...]:
        return ("generate", "the ", "-n", "60", "--seed", str(seed), "--no-stop-at-eot", "-t", "1.2")

    a, b = chargen(*args(7), cwd=project), chargen(*args(7), cwd=project)
    assert a.returncode == 0 and a.stdout == b.stdout
    assert chargen(*args(8), cwd=project).stdout != a.stdout
    for precision in ("fp32", "int4"):
        other = chargen(*args(7), "--precision", precision, cwd=project)
        assert other.returncode == 0 and other.stdout == chargen(*args(7), "-p", precision, cwd=project).stdout
        assert len(other.stdout) == 60


def test_no_draft_decodes_one_character_per_call(project: Path, tiny_models) -> None:
    """--no-draft gives generate_ids(draft=False)'s text; in fp32 the draft changes nothing."""
    from chargen.generate import generate
    from chargen.model import ChargenModel

    args = ("generate", "the", "-n", "80", "--seed", "5", "--no-stop-at-eot", "-t", "1.0")
    for precision in ("int8", "fp32"):
        m = ChargenModel.load(getattr(tiny_models, precision))
        plain = "".join(t[0] for t in generate(m, "the", 80, seed=5, stop_at_eot=False, draft=False))
        r = chargen(*args, "--no-draft", "-p", precision, cwd=project)
        assert r.returncode == 0 and r.stdout == plain
    fp32 = chargen(*args, "-p", "fp32", cwd=project)
    assert fp32.stdout == chargen(*args, "-p", "fp32", "--no-draft", cwd=project).stdout


def test_model_is_found_by_flag_then_environment_then_project(project: Path, tiny_models, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    args = ("generate", "the", "-n", "30", "--seed", "3", "--no-stop-at-eot")
    from_project = chargen(*args, cwd=project).stdout
    from_env = chargen(*args, cwd=elsewhere, env={"CHARGEN_MODEL": str(tiny_models.int8)})
    assert from_env.returncode == 0 and from_env.stdout == from_project
    fp32 = chargen(*args, "-p", "fp32", cwd=project).stdout
    flag_wins = chargen(*args, "--model", str(tiny_models.fp32), cwd=project,
                        env={"CHARGEN_MODEL": str(tiny_models.int8)})
    assert flag_wins.stdout == fp32


def test_generation_stops_at_end_of_text(eot_model: Path) -> None:
    lengths = []
    for seed in range(3):
        r = chargen("generate", "abc", "--model", str(eot_model), "-n", "400", "--seed", str(seed))
        assert r.returncode == 0, r.stderr
        lengths.append(len(r.stdout))
    assert max(lengths) < 400  # P(no end-of-text in 400 draws) = 0.9 ** 400
    r = chargen("generate", "abc", "--model", str(eot_model), "-n", "400", "--seed", "0", "--no-stop-at-eot")
    assert len(r.stdout) == 400  # end-of-text prints nothing and does not count as a character


def test_samples_end_independently_and_are_separated(eot_model: Path) -> None:
    r = chargen("generate", "--model", str(eot_model), "-n", "300", "--num-samples", "3", "--seed", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("===")] == [f"=== sample {i}/3 ===" for i in (1, 2, 3)]
    bodies = [lines[i] for i in (1, 3, 5)]
    assert len(lines) == 6 and len(set(bodies)) == 3
    assert all(len(b) < 300 and set(b) <= set("abcdefgh") for b in bodies)


def test_batched_samples_are_deterministic(project: Path) -> None:
    args = ("generate", "the", "-n", "50", "--num-samples", "4", "--seed", "11", "--no-stop-at-eot")
    r = chargen(*args, cwd=project)
    assert r.returncode == 0 and r.stdout == chargen(*args, cwd=project).stdout
    assert r.stdout.count("=== sample ") == 4


def test_generation_slides_past_the_context_window(project: Path, tiny_models) -> None:
    W = tiny_models.model.cfg.block_size
    long_prompt = tiny_models.text[: 3 * W]
    for prompt in ("the", long_prompt):
        r = chargen("generate", prompt, "-n", str(5 * W), "--seed", "4", "--no-stop-at-eot", cwd=project)
        assert r.returncode == 0, r.stderr
        assert len(r.stdout) == 5 * W  # the tiny model never saw end-of-text, so it never emits it


def test_prompt_from_stdin(project: Path) -> None:
    args = ("-n", "20", "--seed", "5", "--no-stop-at-eot")
    piped = chargen("generate", "-", *args, cwd=project, stdin="the dog")
    assert piped.returncode == 0 and piped.stdout == chargen("generate", "the dog", *args, cwd=project).stdout


def test_unknown_prompt_characters_warn_or_fail_with_strict(project: Path) -> None:
    r = chargen("generate", "the ZEBRA", "-n", "10", "--seed", "1", cwd=project)
    assert r.returncode == 0
    assert r.stderr.startswith("warning:") and "'Z'" in r.stderr and "'E'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    strict = chargen("generate", "the ZEBRA", "--strict", cwd=project)
    assert_one_line_error(strict, 1, "'Z'", "--strict")
    assert strict.stdout == ""


def test_closing_the_pipe_early_ends_quietly(project: Path) -> None:
    proc = subprocess.Popen([*CLI, "generate", "the", "-n", "100000", "--no-stop-at-eot"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(20)
    proc.stdout.close()  # like `| head -c 20`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert err == ""


# ---------------------------------------------------------------------------- bad input


def test_no_model_found_says_where_it_looked(tmp_path: Path) -> None:
    r = chargen("generate", "hi", cwd=tmp_path)
    assert_one_line_error(r, 2, "no model found", "models/model.int8.onnx", "CHARGEN_MODEL", "dvc repro", "--model")
    r = chargen("info", "-p", "fp32", cwd=tmp_path)
    assert_one_line_error(r, 2, "models/model.fp32.onnx")


def test_missing_model_from_flag_or_environment(tmp_path: Path) -> None:
    assert_one_line_error(chargen("generate", "--model", str(tmp_path / "x.onnx")), 2, "x.onnx", "--model")
    r = chargen("generate", cwd=tmp_path, env={"CHARGEN_MODEL": str(tmp_path / "y.onnx")})
    assert_one_line_error(r, 2, "y.onnx", "CHARGEN_MODEL")


def test_truncated_or_foreign_model_files(tiny_models, tmp_path: Path) -> None:
    data = tiny_models.int8.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    assert_one_line_error(chargen("generate", "--model", str(tmp_path / "truncated.onnx")), 1,
                          "not a readable ONNX model")
    (tmp_path / "notes.txt").write_text("just some text\n")
    assert_one_line_error(chargen("info", "--model", str(tmp_path / "notes.txt")), 1, "not a readable ONNX model")
    proto = onnx.load(str(tiny_models.fp32))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    assert_one_line_error(chargen("generate", "--model", str(tmp_path / "plain.onnx")), 1, "not a chargen model")


@pytest.mark.parametrize(("args", "option"), [
    (("--temperature", "0"), "--temperature"),
    (("-t", "-1"), "--temperature"),
    (("--top-p", "0"), "--top-p"),
    (("--top-p", "1.5"), "--top-p"),
    (("--top-k", "-2"), "--top-k"),
    (("--max-new-chars", "-1"), "--max-new-chars"),
    (("--num-samples", "0"), "--num-samples"),
    (("--precision", "fp16"), "--precision"),
    (("--temperature", "inf"), "--temperature"),
    (("--temperature", "nan"), "--temperature"),
    (("--seed", "-1"), "--seed"),
    (("--threads", "100000000"), "--threads"),
    (("-k", "4"), "-k"),
])
def test_out_of_range_options_are_usage_errors(project: Path, args: tuple[str, ...], option: str) -> None:
    assert_usage_error(chargen("generate", "the", *args, cwd=project), option)


# ---------------------------------------------------------------------------- info, eval, bench, help


def test_info_reports_what_is_in_the_model(project: Path, tiny_models) -> None:
    r = chargen("info", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    cfg = tiny_models.model.cfg
    assert info["precision"] == "int8"
    assert info["parameters"] == tiny_models.model.num_params()
    assert info["tokenizer"] == tiny_models.tokenizer.describe()
    assert info["context_length"] == cfg.block_size
    assert info["draft_table"] == "3-token contexts, 1,024 entries"
    assert info["metrics"] == {"val_loss": 0.0, "test_loss": 0.0, "step": 0}
    text = chargen("info", "-p", "fp32", cwd=project)
    assert text.returncode == 0 and "precision:" in text.stdout and "fp32" in text.stdout
    assert f"{tiny_models.model.num_params():,}" in text.stdout
    assert f"tokenizer:      char, {cfg.vocab_size} tokens" in text.stdout
    int4 = json.loads(chargen("info", "-p", "int4", "--json", cwd=project).stdout)
    assert int4["precision"] == "int4" and int4["parameters"] == info["parameters"]
    assert int4["file_bytes"] < info["file_bytes"]  # smaller than int8


def test_eval_matches_the_runtime_score_for_both_precisions(project: Path, tiny_models) -> None:
    from chargen.model import ChargenModel
    from chargen.scoring import score

    sample = project / "sample.txt"
    sample.write_text(tiny_models.text[:400], encoding="utf-8")
    r = chargen("eval", str(sample), "--both", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [x["precision"] for x in out["results"]] == ["fp32", "int8"]
    ids = tiny_models.tokenizer.encode(tiny_models.text[:400])
    total, n = score(ChargenModel.load(tiny_models.fp32), ids)
    fp32 = out["results"][0]
    assert fp32["chars"] == n == 399
    assert fp32["loss"] == pytest.approx(total / n, rel=1e-6)
    assert fp32["bits_per_char"] == pytest.approx(total / n / math.log(2), rel=1e-6)
    assert out["int8_minus_fp32_bits_per_char"] == pytest.approx(
        out["results"][1]["bits_per_char"] - fp32["bits_per_char"])
    table = chargen("eval", str(sample), "--both", cwd=project)
    assert table.returncode == 0 and "bits/char" in table.stdout and "int8 - fp32:" in table.stdout


def test_eval_streams_a_long_file_with_the_same_loss(project: Path, tiny_models) -> None:
    """A text of many pieces and batches (CRLF line ends) scores as the whole array does."""
    from chargen.model import ChargenModel
    from chargen.scoring import score

    text = tiny_models.text * 80  # ~150k characters: three pieces, hundreds of batches
    big = project / "big.txt"
    big.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    r = chargen("eval", str(big), "--json", "--progress", "--batch-size", "32", cwd=project)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["results"][0]
    total, n = score(ChargenModel.load(tiny_models.int8), tiny_models.tokenizer.encode(text), batch_size=32)
    assert got["chars"] == n == len(text) - 1
    assert got["loss"] == total / n  # batches scored side by side (one per core), summed in order
    assert "chars/s" in r.stderr and r.stderr.endswith("\n")  # the bar, on stderr only
    with big.open("rb") as f:  # stdin redirected from the file: its size is known
        redirected = subprocess.run([*CLI, "eval", "-", "--json", "--progress", "--batch-size", "32"],
                                    stdin=f, capture_output=True, text=True, cwd=project, timeout=120)
    assert json.loads(redirected.stdout)["results"][0]["loss"] == got["loss"]
    assert "100.0%" in redirected.stderr
    piped = chargen("eval", "-", "--progress", cwd=project, stdin=text[:5000])  # a pipe: a count
    assert piped.returncode == 0 and " M chars " in piped.stderr and "%" not in piped.stderr


def test_eval_bad_input(project: Path, tmp_path: Path) -> None:
    assert_one_line_error(chargen("eval", str(tmp_path / "none.txt"), cwd=project), 1, "none.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_one_line_error(chargen("eval", str(tmp_path / "latin1.txt"), cwd=project), 1, "not UTF-8")
    (tmp_path / "short.txt").write_text("a")
    assert_one_line_error(chargen("eval", str(tmp_path / "short.txt"), cwd=project), 1, "at least 2")
    assert_usage_error(chargen("eval", "x.txt", "--both", "--model", "m.onnx", cwd=project), "--both")


def test_bench_reports_every_precision(project: Path) -> None:
    r = chargen("bench", "--chars", "10", "--repeats", "1", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)["results"]
    assert set(results) == set(contract.PRECISIONS)
    for row in results.values():
        for key in ("load_ms", "short_first_char_ms", "short_chars_per_s", "long_first_char_ms", "long_chars_per_s"):
            assert row[key] > 0


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"]])
def test_help_into_a_closed_pipe_is_no_failure(args: list[str]) -> None:
    """`chargen --help | head -n 1`: the reader leaves before the help is written."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert (proc.wait(timeout=60), proc.stderr.read()) == (0, b"")


@pytest.mark.parametrize("command", ["generate", "eval", "bench", "info"])
def test_every_command_has_help_with_examples(command: str) -> None:
    r = chargen(command, "--help")
    assert r.returncode == 0 and "Examples" in r.stdout and f"chargen {command}" in r.stdout


def test_no_arguments_shows_the_commands() -> None:
    r = chargen()
    assert all(c in r.stdout + r.stderr for c in ("generate", "bench", "eval", "info"))
