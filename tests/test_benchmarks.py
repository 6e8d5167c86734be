"""The benchmark scripts run end to end on tiny inputs and print what they promise.

Only their plumbing is checked here; the numbers they print are measurements,
which belong in the README, not in assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import (
    KIND_TEXT,
    KIND_TRAIN,
    REPO,
    ROOT_PARAMS,
    TINY_CONFIG,
    TINY_TEXT,
    project_params,
    stage_env,
    write_encoded,
)

from chargen.draft import MAX_BITS


def run_benchmark(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300, check=False,
    )


def test_quantize_benchmark_measures_every_choice_and_width(tiny_models, tmp_path):
    write_encoded(tmp_path / "encoded", tiny_models.tokenizer)
    done = run_benchmark(
        "quantize", "--model", str(tiny_models.fp32), "--encoded", str(tmp_path / "encoded"),
        "--params", str(ROOT_PARAMS),
        "--widths", "32", "64", "--context", "40", "--chars", "20", "--repeats", "1", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    choices = result["choices"]
    assert set(choices) == {"fp32", "matmul_only", "matmul_and_gather", "per_channel", "no_reduce_range",
                            "int4_block32", "int4_block64", "int4_block128"}
    assert choices["fp32"]["size_frac_of_fp32"] == 1.0 and choices["fp32"]["speed_over_fp32"] == 1.0
    for name, m in choices.items():
        assert math.isfinite(m["test_loss"]) and m["chars_per_s"] > 0, name
        assert name == "fp32" or m["size_frac_of_fp32"] < 1.0
    # Quantizing the embedding and the n-gram tables as well can only shrink the file further.
    assert choices["matmul_and_gather"]["size_frac_of_fp32"] < choices["matmul_only"]["size_frac_of_fp32"]
    assert choices["int4_block64"]["size_frac_of_fp32"] < choices["matmul_and_gather"]["size_frac_of_fp32"]
    assert set(result["widths"]) == {"32", "64"}
    for w in result["widths"].values():
        assert w["int8_over_fp32"] == w["int8_chars_per_s"] / w["fp32_chars_per_s"]


def test_quantize_benchmark_names_a_missing_model(tmp_path):
    done = run_benchmark("quantize", "--model", str(tmp_path / "none.onnx"), cwd=tmp_path)
    assert done.returncode == 2
    assert "none.onnx does not exist; run `dvc repro` first" in done.stderr
    assert "Traceback" not in done.stderr


def recipe_project(root: Path) -> Path:
    """A project with a local corpus and a tiny model: params.yaml the recipe runner starts from."""
    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "tiny.txt").write_text(TINY_TEXT * 4, encoding="utf-8")
    params = project_params()
    params["download"]["sources"] = [{"name": "local", "path": "corpus"}]
    params["model"].update(TINY_CONFIG)
    params["train"].update(max_steps=50, warmup_steps=2, eval_interval=4, checkpoint_interval=4,
                           eval_windows=8, batch_size=4, threads=1, dtype="float32")
    params["sample"].update(num_samples=2, chars=60)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


def test_recipe_benchmark_trains_the_overridden_recipe_and_evaluates_it(tmp_path):
    project = recipe_project(tmp_path / "project")
    done = run_benchmark("recipe", "train.max_steps=6", "model.n_layer=1", cwd=project)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["command"] == "python -m benchmarks.recipe train.max_steps=6 model.n_layer=1"
    assert result["steps"] == 6
    for key in ("val_loss", "test_loss", "tokens_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert 0 <= result["train_seconds"] < 60  # six tiny steps: rounded to 0.1 s, it may read 0.0
    assert 0 <= result["spelling_rate_4plus"] <= 1 and 0 <= result["spelling_rate"] <= 1
    assert list(result["val_curve"]) == ["0", "4", "6"]  # every eval_interval, and the last step
    assert result["val_loss"] == min(result["val_curve"].values())
    one_layer = result["params"]
    done = run_benchmark("recipe", "train.max_steps=1", cwd=project)
    assert json.loads(done.stdout)["params"] > one_layer  # params.yaml's two layers
    # Everything but the download cache went to a temporary directory.
    assert {p.name for p in project.iterdir()} <= {".cache", "corpus", "params.yaml"}


def test_recipe_benchmark_names_a_bad_override(tmp_path):
    project = recipe_project(tmp_path / "project")
    for override, message in [("max_steps=6", "expected section.key=value"),
                              ("training.max_steps=6", "params.yaml has no section 'training'"),
                              ("train.max_step=6", "unknown parameter 'train.max_step'"),
                              ("train.max_steps.sub=1", "'train.max_steps' is a single value, not a section"),
                              ("quantize.op_types=[MatMul", "the value is not valid YAML")]:
        done = run_benchmark("recipe", override, cwd=project)
        assert done.returncode == 1, override
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_recipe_benchmark_reads_override_values_as_yaml(tmp_path):
    """As ``dvc exp run -S`` does: a list is a list, a number a number."""
    project = recipe_project(tmp_path / "project")
    done = run_benchmark("recipe", "quantize.op_types=[MatMul, Gather]", "train.max_steps=1", cwd=project)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 1


def test_tokenizers_benchmark_trains_each_row_for_the_same_time(tmp_path):
    """Its four commands on a tiny corpus and model: each row trains the steps its measured
    speed gives in the budget, and the table holds every column per row."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(KIND_TEXT, encoding="utf-8")
    (tmp_path / "corpus" / "b.txt").write_text(KIND_TEXT[::-1], encoding="utf-8")
    raw = project_params()
    raw["download"]["sources"] = [{"name": "tiny", "path": str(tmp_path / "corpus")}]
    raw["model"].update(TINY_CONFIG)
    raw["train"].update(KIND_TRAIN)
    raw["sample"].update(num_samples=2, chars=60)
    raw["compare"].update(long_context=20, timed_chars=20)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    rows = ["char", "bpe:300"]
    common = ["--out", "exp", "--rows", *rows]
    for step, *extra in (["prepare"], ["throughput", "--timed-steps", "2"], ["train", "--budget-s", "0.5"],
                         ["speed", "--repeats", "1"]):
        done = run_benchmark("tokenizers", step, *common, *extra, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    rates = json.loads((tmp_path / "exp" / "throughput.json").read_text())
    prepared = json.loads((tmp_path / "exp" / "prepare.json").read_text())
    assert [r["tokenizer"] for r in result["rows"]] == rows
    for r in result["rows"]:
        assert r["budget_s"] == 0.5
        assert r["steps"] == max(1, round(0.5 * rates[r["tokenizer"]]["steps_per_s"]))
        assert r["test_nats_per_char"] == pytest.approx(r["test_loss_per_token"] / r["chars_per_token"])
        per_token = prepared[r["tokenizer"]]["train_chars_per_token"]
        assert r["train_chars_per_s"] == round(r["train_tokens_per_s"] * per_token)
        assert r["int8_chars_per_s"] > 0 and r["int8_process_start_to_first_char_s"] > 0
        assert math.isfinite(r["int8_minus_fp32_nats_per_char"])
        assert 0 < r["lookup_table_share"] < 1 and r["parity_max_abs_diff"] <= 1e-4
    by_kind = {r["tokenizer"]: r for r in result["rows"]}
    assert by_kind["char"]["chars_per_token"] == pytest.approx(1.0, abs=0.01)
    assert by_kind["bpe:300"]["chars_per_token"] > 1.0
    assert by_kind["bpe:300"]["vocab_size"] == 300


def test_decode_benchmark_times_streams_batches_steps_and_scoring(tiny_models, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT, encoding="utf-8")
    done = run_benchmark(
        "decode", "--models", str(tiny_models.int8), str(tiny_models.fp32), "--context", "40", "--chars", "30",
        "--repeats", "1", "--num-samples", "3", "--batch-chars", "10", "--breakdown", "--eval-file", str(text),
        "--agreement", "--agreement-tokens", "30",
        cwd=ROOT_PARAMS.parent,
    )
    assert done.returncode == 0, done.stderr
    models = json.loads(done.stdout)["models"]
    assert [m["precision"] for m in models.values()] == ["int8", "fp32"]
    for m in models.values():
        assert m["single_stream"]["chars_per_s_best"] >= m["single_stream"]["chars_per_s_median"] > 0
        assert m["draft_table"] and m["single_stream_without_draft"]["chars_per_s_median"] > 0
        assert m["tokens_per_call"] > 1.2  # the tiny model follows its text: guesses hold
        agreement = m["draft_agreement"]
        assert len(agreement["first_difference"]) == 5 and agreement["positions"] == 30
        assert 0 <= agreement["row_total_variation_mean"] <= agreement["row_total_variation_max"] < 0.1
        if m["precision"] == "fp32":
            assert agreement["first_difference"] == [None] * 5  # the same text, token for token
        assert m["batch_3"]["total_chars_per_s_median"] > 0
        assert set(m["step_breakdown"]) == {"forward_call_us", "bound_cache_step_us", "sample_us",
                                            "three_token_call_us", "draw_after_three_token_call_us",
                                            "whole_step_us"}
        assert m["eval"]["tokens"] == len(TINY_TEXT) and math.isfinite(m["eval"]["loss"])


def test_draft_benchmark_compares_tables_built_from_the_train_split(tiny_models, tmp_path):
    write_encoded(tmp_path / "encoded", tiny_models.tokenizer)
    done = run_benchmark(
        "draft", "--model", str(tiny_models.int8), "--encoded", str(tmp_path / "encoded"),
        "--tables", "2:8:1", "3:10:1", "3:10:1000", "--context", "40", "--chars", "30", "--repeats", "2",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    tables = json.loads(done.stdout)["tables"]
    assert list(tables) == ["2:8:1", "3:10:1", "3:10:1000"]
    for row in tables.values():
        assert row["chars_per_s_best"] >= row["chars_per_s_median"] > 0 and row["stored_bytes"] > 0
    assert tables["3:10:1"]["tokens_per_call"] > 1.2  # the tiny model follows its text: guesses hold
    # A count no context reaches leaves every bucket empty: one token per call.
    assert tables["3:10:1000"]["guessing_buckets"] == 0 and tables["3:10:1000"]["tokens_per_call"] == 1


@pytest.mark.parametrize("table", ["4-17", "4:99:1", f"4:{MAX_BITS + 1}:1", "0:10:1", "4:10:0"])
def test_draft_benchmark_names_a_bad_table(tiny_models, tmp_path, table):
    """Bits outside the runtime's range, or a context or count below one, are refused before any work."""
    done = run_benchmark("draft", "--model", str(tiny_models.int8), "--tables", "3:10:1", table, cwd=tmp_path)
    assert done.returncode == 2 and f"argument --tables: {table!r}" in done.stderr, done.stderr
    assert ("is not CONTEXT:BITS:MIN_COUNT" if "-" in table else f"BITS from 1 to {MAX_BITS}") in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("name", "args", "message"), [
    ("decode", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    ("decode", ["--num-samples", "-3"], "argument --num-samples: must be at least 0, got -3"),
    ("generate", ["--chars", "0"], "argument --chars: must be at least 1, got 0"),
    ("train_throughput", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    ("startup", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
])
def test_benchmarks_refuse_a_count_out_of_range(tmp_path, name, args, message):
    done = run_benchmark(name, *args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not done.stdout


@pytest.mark.parametrize(("name", "option"), [
    ("decode", "--models"), ("draft", "--model"), ("generate", "--checkpoint"), ("finetune", "--base"),
])
def test_benchmarks_name_a_missing_model_or_checkpoint(tmp_path, name, option):
    """One line naming the option, exit 1; never a random-init model in place of a checkpoint."""
    done = run_benchmark(name, option, str(tmp_path / "none.file"), cwd=REPO)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: {option}: {tmp_path / 'none.file'} does not exist; pass ")
    assert len(done.stderr.splitlines()) == 1 and not done.stdout


def test_generate_benchmark_names_a_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    done = run_benchmark("generate", "--checkpoint", str(tmp_path / "bad.pt"), cwd=REPO)
    assert done.returncode == 1 and "corrupt or not a chargen checkpoint" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and not done.stdout


def test_tokenizers_benchmark_names_a_bad_row_and_a_missing_step(tmp_path):
    for row in ("bytes", "bpe:abc"):
        done = run_benchmark("tokenizers", "prepare", "--out", "exp", "--rows", "char", row, cwd=tmp_path)
        assert done.returncode == 2 and f"argument --rows: {row!r} is not KIND or KIND:VOCAB_SIZE" in done.stderr
        assert "char, byte, bpe" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "exp").exists()  # nothing was encoded under a wrong name
    done = run_benchmark("tokenizers", "speed", "--out", "exp", "--rows", "char", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "run `python -m benchmarks.tokenizers prepare --out exp --rows char` first" in done.stderr
