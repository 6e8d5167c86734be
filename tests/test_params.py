"""The typed params loader: the project's params.yaml, misspelt keys, string numbers, stage errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import run_stage_script

from pipeline.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def test_the_project_params_load_and_validate():
    p = load_params(ROOT / "params.yaml")
    assert p.model.n_embd % p.model.n_head == 0
    assert p.encode.train_frac + p.encode.val_frac + p.encode.test_frac == pytest.approx(1.0)
    assert p.download.sources[0].sha256  # the default corpus is pinned


def test_a_misspelt_key_is_named(tmp_path):
    path = write_params(tmp_path, lambda r: r["train"].update(learning_rate=1e-3))
    with pytest.raises(ParamsError, match=r"unknown parameter 'train.learning_rate'"):
        load_params(path)


def test_numbers_written_as_strings_are_coerced(tmp_path):
    # `dvc exp run -S train.lr=1e-5` writes 1e-5, which YAML 1.1 (PyYAML) reads as a string.
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    text = text.replace("  lr: 5.0e-3\n", "  lr: 1e-5\n").replace("  min_lr: 5.0e-4\n", "  min_lr: 1e-6\n")
    text = re.sub(r"\n  max_steps: \d+\n", "\n  max_steps: '300'\n", text)
    path.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["train"]["lr"] == "1e-5"
    p = load_params(path)
    assert p.train.lr == 1e-5 and p.train.min_lr == 1e-6 and p.train.max_steps == 300


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["model"].update(mlp="tanh"), r"model.mlp: must be one of"),
        (lambda r: r["model"].update(n_head=5), r"divisible by model.n_head"),
        (lambda r: r["train"].update(batch_size="many"), r"train.batch_size: expected an integer"),
        (lambda r: r["train"].update(max_steps=2.5), r"train.max_steps: expected an integer"),
        (lambda r: r["encode"].update(val_frac=0.5), r"must be 1.0"),
        (lambda r: r["model"].update(bias="perhaps"), r"model.bias: expected true or false"),
        (lambda r: r["export"].update(opset=20), r"export.opset: must be >= 24 and <= 25, got 20"),
        (lambda r: r.pop("download"), r"missing parameter 'download'"),
        (lambda r: r["train"].pop("lr"), r"missing parameter 'train.lr'"),
        (lambda r: r["train"].update(lr=float("inf")), r"train.lr: must be a finite number"),
        (lambda r: r["sample"].update(temperature=float("nan")), r"sample.temperature: must be a finite number"),
        (lambda r: r["sample"].update(top_k=-1), r"sample.top_k: must be >= 0, got -1"),
        (lambda r: r["encode"].update(out_dir=""), r"encode.out_dir: must not be empty"),
        (lambda r: r["encode"].update(val_frac=0.0, train_frac=0.95), r"encode.val_frac: must be > 0"),
        (lambda r: r["download"]["sources"][0].update(name=""), r"download.sources.name: must not be empty"),
    ],
)
def test_invalid_values_are_one_line_errors_naming_the_key(tmp_path, edit, message):
    path = write_params(tmp_path, edit)
    with pytest.raises(ParamsError, match=message) as e:
        load_params(path)
    assert "\n" not in str(e.value)


def test_a_stage_reports_a_bad_param_in_one_line_and_exits_1(tmp_path):
    path = write_params(tmp_path, lambda r: r["train"].update(lr="fast"))
    proc = run_stage_script("train", tmp_path, "--params", str(path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: train.lr: expected a number, got 'fast'"]
