"""The arithmetic recipe: a seeded generator whose held-out problems never occur in
training, records that end with end-of-text, exact-match answer checking, a tiny model
trained on easy sums and measured in PyTorch and through every ONNX model, and the
recipe's folder as a DVC project of its own."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_stage_script, stage_env
from dvcproject import dvc
from hypothesis import given, settings
from hypothesis import strategies as st

from chargen.arithmetic import (
    EQUATION,
    Problem,
    accuracy_report,
    answer_text,
    describe,
    is_correct,
    parse_problem,
)
from chargen.contract import PRECISIONS
from chargen.tokenizers import CharTokenizer
from pipeline.corpus.arithmetic import GeneratorError, generate, heldout_cells, solve, split_of
from pipeline.corpus.download import run_download
from pipeline.corpus.manifest import ManifestError, read_manifest
from pipeline.evaluation.arithmetic import heldout_problems, trained_digits
from pipeline.evaluation.evaluate import greedy_answers
from pipeline.export.model_file import export_checkpoint
from pipeline.export.quantize import quantize_int4, quantize_int8
from pipeline.model import GPT, GPTConfig
from pipeline.params import ArithmeticParams, Operation, ParamsError, Source, load_params
from pipeline.tokens.encode import encode_corpus
from pipeline.tokens.splits import read_split, read_tokenizer
from pipeline.tokens.utf8 import EncodeError
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.train import train

RECIPE_DIR = REPO / "recipes" / "arithmetic"
RECIPE = RECIPE_DIR / "params.yaml"


def spec(**kw) -> ArithmeticParams:
    base = dict(seed=0, answer="reversed", operations=(Operation("add", (1, 2), 1.0),),
                train_problems=200, val_problems=20, test_problems=30, val_frac=0.1, test_frac=0.2,
                longer_test=True)
    return ArithmeticParams(**{**base, **kw})


def lines(text: str) -> list[str]:
    assert text.endswith("\n")
    return text.splitlines()


# --------------------------------------------------------------------------- the generator

operations = st.lists(
    st.builds(lambda op, lo, extra, w: Operation(op, (lo, lo + extra), w),
              st.sampled_from(["add", "sub", "mul", "div"]), st.integers(2, 3), st.integers(0, 1),
              st.floats(0.1, 3)),
    min_size=1, max_size=4, unique_by=lambda o: o.op,
)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32), answer=st.sampled_from(["plain", "reversed"]), ops=operations,
       val_frac=st.floats(0.05, 0.3), test_frac=st.floats(0.05, 0.3))
def test_generator_is_deterministic_and_never_trains_on_a_held_out_problem(seed, answer, ops, val_frac, test_frac):
    s = spec(seed=seed, answer=answer, operations=tuple(ops), val_frac=val_frac, test_frac=test_frac)
    docs = generate(s)
    assert docs == generate(s)  # same spec, same bytes
    problems = {}
    for split, text in docs.items():
        for line in lines(text):
            p = parse_problem(line)
            assert p is not None, line
            a, _, b, _ = EQUATION.fullmatch(line).groups()
            result = str(solve(int(a), p.op, int(b)))
            assert p.answer == (result[::-1] if answer == "reversed" else result)
            # The split follows from the problem alone, whatever its position or format.
            assert split_of(p.prompt[:-1], val_frac, test_frac) == split
            problems.setdefault(split, set()).add(p.prompt)
    assert not problems["train"] & (problems["val"] | problems.get("test", set()))
    assert not problems["val"] & problems.get("test", set())
    test = [parse_problem(line) for line in lines(docs["test"])]
    assert len({p.prompt for p in test}) == len(test)  # held-out problems are distinct
    assert {(p.op, p.digits) for p in test} <= {(op, (da, db)) for op, da, db in heldout_cells(s)}


def test_another_seed_draws_other_problems_but_holds_out_the_same_ones():
    a, b = generate(spec(seed=1)), generate(spec(seed=2))
    assert a["train"] != b["train"]
    held_out = {line.split("=")[0] for line in lines(a["test"]) + lines(b["test"])}
    trained = {line.split("=")[0] for line in lines(a["train"]) + lines(b["train"])}
    assert not held_out & trained
    plain = generate(spec(seed=1, answer="plain"))
    assert [line.split("=")[0] for line in lines(plain["test"])] == [line.split("=")[0] for line in lines(a["test"])]


def test_sub_and_div_have_no_negative_or_undefined_answers():
    docs = generate(spec(operations=(Operation("sub", (1, 2), 1.0), Operation("div", (1, 2), 1.0)),
                         answer="plain", longer_test=False))
    for line in lines(docs["train"]) + lines(docs["test"]):
        p = parse_problem(line)
        a, _, b, _ = (int(x) if x.isdigit() else x for x in EQUATION.fullmatch(line).groups())
        assert a >= b and (p.op != "div" or b > 0)


def test_test_cells_cover_every_digit_pair_and_one_longer():
    s = spec(operations=(Operation("mul", (1, 2), 1.0),))
    assert list(heldout_cells(s)) == [("mul", 1, 1), ("mul", 2, 1), ("mul", 2, 2), ("mul", 3, 3)]
    assert list(heldout_cells(dataclasses.replace(s, longer_test=False)))[-1] == ("mul", 2, 2)


def test_a_split_too_small_to_fill_is_a_clear_error():
    with pytest.raises(GeneratorError, match="val split holds too few"):
        generate(spec(operations=(Operation("add", (1, 1), 1.0),), val_frac=0.001, val_problems=5))


def test_bad_generator_settings_are_one_line_errors():
    with pytest.raises(ParamsError, match=r"digits: expected \[fewest, most\]"):
        Operation("add", (3, 1), 1.0)
    with pytest.raises(ParamsError, match="val_frac \\+ test_frac must be below 1"):
        spec(val_frac=0.5, test_frac=0.5)
    with pytest.raises(ParamsError, match="takes no sha256 or members"):
        Source(name="a", arithmetic=spec(), sha256="0" * 64)
    with pytest.raises(ParamsError, match="exactly one of index, url, path or arithmetic"):
        Source(name="a", arithmetic=spec(), path="corpus")


# --------------------------------------------------------------------------- answers


def test_answers_count_only_when_exactly_right():
    tok = CharTokenizer(["<|endoftext|>", "<|unk|>", *"+0123456789="])
    ids = lambda text: tok.encode(text).tolist()  # noqa: E731
    eot = tok.eot_id
    assert answer_text(ids("975") + [eot] + ids("12"), tok) == "975"
    assert answer_text(ids("975"), tok) is None  # never ended
    assert is_correct("975", "975")
    for wrong in ("9750", "97", "0975", "", " 975", "97a", None):
        assert not is_correct(wrong, "975")
    assert parse_problem("123+456=975") == Problem("123+456=", "975", "add", (3, 3))
    assert parse_problem("45*123=5535").digits == (3, 2)
    for not_one in ("123+456=", "12+3=4=5", "a+1=2", "1 + 2=3", "-1+2=1", "ROMEO:"):
        assert parse_problem(not_one) is None


def test_accuracy_report_by_operation_and_cell_keeps_longer_operands_apart():
    problems = [parse_problem(t) for t in ("1+2=3", "3+4=7", "12+3=51", "123+456=975", "2*3=6")]
    answers = ["3", "8", "51", "975", None]
    r = accuracy_report(problems, answers, {"add": 2, "mul": 1})
    assert r["accuracy"] == pytest.approx(2 / 4) and r["problems"] == 4
    assert r["accuracy_longer"] == 1.0 and r["problems_longer"] == 1
    assert r["add"] == {"accuracy": pytest.approx(2 / 3), "1x1": 0.5, "2x1": 1.0, "3x3": 1.0}
    assert r["mul"] == {"accuracy": 0.0, "1x1": 0.0}
    assert r["counts"] == {"add": {"1x1": 2, "2x1": 1, "3x3": 1}, "mul": {"1x1": 1}}
    assert describe(r) == "arithmetic accuracy 50.0% (one digit longer: 100.0%)"
    assert describe(accuracy_report(problems[:1], ["3"], {"add": 1})) == "arithmetic accuracy 100.0%"


# --------------------------------------------------------------------------- download and encode


def download_and_encode(root: Path, s: ArithmeticParams, tokenizer: str = "char") -> Path:
    params = load_params(RECIPE)
    source = Source(name="arithmetic", arithmetic=s)
    download = dataclasses.replace(params.download, sources=(source,), out_dir=str(root / "raw"))
    run_download(download)
    encode_corpus(root / "raw", dataclasses.replace(params.encode, out_dir=str(root / "encoded"),
                                                    tokenizer=tokenizer, vocab_size=300))
    return root / "encoded"


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_each_split_holds_its_own_document_one_record_per_equation(tmp_path, kind):
    s = spec()
    encoded = download_and_encode(tmp_path, s, kind)
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert [(d["file"], d["split"], d["line_records"]) for d in manifest["documents"]] == [
        ("arithmetic/test.txt", "test", True), ("arithmetic/train.txt", "train", True),
        ("arithmetic/val.txt", "val", True)]
    assert manifest["sources"] == [{"name": "arithmetic", "kind": "arithmetic",
                                    "spec": json.loads(json.dumps(dataclasses.asdict(s))), "documents": 3}]
    tokenizer = read_tokenizer(encoded)
    docs = generate(s)
    for split in ("train", "val", "test"):
        ids = read_split(encoded, split)
        assert ids[-1] == tokenizer.eot_id and (ids == tokenizer.eot_id).sum() == len(lines(docs[split]))
        assert tokenizer.decode(ids, eot="\n") == docs[split]  # end-of-text where each line ended
    assert [p.prompt + p.answer for p in heldout_problems(encoded)] == lines(docs["test"])
    assert trained_digits(encoded) == {"add": 2}


def test_manifest_splits_are_checked(tmp_path):
    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "a" / "x.txt").write_text("1+1=2\n")
    for entry, message in (({"split": "dev"}, "split must be one of train, val, test"),
                           ({"line_records": True}, "true only with a split")):
        (raw / "manifest.json").write_text(json.dumps({"documents": [{"file": "a/x.txt", **entry}]}))
        with pytest.raises(ManifestError, match=message):
            read_manifest(raw)


def test_a_record_document_must_end_its_last_line(tmp_path):
    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "a" / "x.txt").write_text("1+1=2\n2+2=4")
    (raw / "manifest.json").write_text(json.dumps(
        {"documents": [{"file": "a/x.txt", "split": "train", "line_records": True}]}))
    encode = dataclasses.replace(load_params(RECIPE).encode, out_dir=str(tmp_path / "encoded"))
    with pytest.raises(EncodeError, match="last one has no line break"):
        encode_corpus(raw, encode)


# --------------------------------------------------------------------------- a tiny model, end to end

EASY = spec(operations=(Operation("add", (1, 1), 1.0),), train_problems=3000, val_problems=200,
            test_problems=50, val_frac=0.1, test_frac=0.25)
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 16}
TINY_TRAIN = {"max_steps": 400, "batch_size": 32, "lr": 1.0e-2, "min_lr": 1.0e-3, "warmup_steps": 20,
              "eval_interval": 400, "eval_windows": 16, "checkpoint_interval": 400, "threads": 1,
              "dtype": "float32", "muon_weight_decay": 0.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project trained on 1-digit sums, exported and quantized, with the recipe's params
    (tiny sizes); stages then run in it as DVC runs them."""
    root = tmp_path_factory.mktemp("arithmetic")
    params = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    params["download"]["sources"] = [{"name": "arithmetic", "arithmetic": json.loads(json.dumps(dataclasses.asdict(EASY)))}]
    params["model"].update(TINY_MODEL)
    params["train"].update(TINY_TRAIN)
    params["compare"].update(long_context=20, timed_chars=20, repeats=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    p = load_params(root / "params.yaml")
    rel = Path(root)
    run_download(dataclasses.replace(p.download, out_dir=str(rel / p.download.out_dir)))
    encode_corpus(rel / p.download.out_dir, dataclasses.replace(p.encode, out_dir=str(rel / p.encode.out_dir)))
    train(p.model, dataclasses.replace(p.train, out_dir=str(rel / p.train.out_dir), live_dir=str(rel / p.train.live_dir)),
          rel / p.encode.out_dir, progress=False)
    for stage in ("evaluate",):
        done = run_stage_script(stage, root, "--params", "params.yaml")
        assert done.returncode == 0, done.stderr
    models = rel / p.export.model_dir
    export_checkpoint(checkpoint=rel / p.train.out_dir / "best.pt", encoded_dir=rel / p.encode.out_dir,
                      metrics_path=rel / p.evaluate.out, out=models / "model.fp32.onnx", opset=p.export.opset,
                      atol=p.export.parity_atol)
    quantize_int8(models / "model.fp32.onnx", models / "model.int8.onnx", p.quantize)
    quantize_int4(models / "model.fp32.onnx", models / "model.int4.onnx", p.quantize)
    for precision in PRECISIONS:
        done = run_stage_script("compare", root, "--precision", precision, "--params", "params.yaml")
        assert done.returncode == 0, done.stderr
    done = run_stage_script("report", root, "--params", "params.yaml")
    assert done.returncode == 0, done.stderr
    return root


def metrics(project: Path, name: str) -> dict:
    return json.loads((project / "recipes" / "arithmetic" / "metrics" / name).read_text(encoding="utf-8"))


def test_training_on_easy_sums_raises_accuracy(project):
    p = load_params(project / "params.yaml")
    encoded = project / p.encode.out_dir
    tokenizer = read_tokenizer(encoded)
    state = load_checkpoint(project / p.train.out_dir / "best.pt")
    torch.manual_seed(p.train.seed)  # the initialisation training started from
    untrained = GPT(GPTConfig(**state["model_config"])).eval()
    trained = GPT(GPTConfig(**state["model_config"]))
    trained.load_state_dict(state["model"])
    seen = list({line: parse_problem(line) for line in
                 (project / p.download.out_dir / "arithmetic" / "train.txt").read_text().split()}.values())

    def accuracy(model: GPT, problems: list[Problem]) -> float:
        answers = greedy_answers(model, tokenizer, problems, 64, torch.device("cpu"))
        return accuracy_report(problems, answers, {"add": 1})["accuracy"]

    # The sums it trained on, and the held-out ones (as the evaluate stage measured them).
    before, after = accuracy(untrained, seen), accuracy(trained, seen)
    assert after >= max(0.5, before + 0.4), (before, after)
    held_out = heldout_problems(encoded)
    measured = metrics(project, "eval.json")["arithmetic"]
    assert measured["problems"] == len([q for q in held_out if q.digits == (1, 1)]) > 0
    assert measured["accuracy"] > accuracy(untrained, [q for q in held_out if q.digits == (1, 1)])


def test_accuracy_is_written_for_pytorch_and_every_onnx_model(project):
    torch_m = metrics(project, "eval.json")["arithmetic"]
    for precision in PRECISIONS:
        m = metrics(project, f"{precision}.json")["arithmetic"]
        assert m.keys() == torch_m.keys() and m["counts"] == torch_m["counts"]
        assert set(m["add"]) == {"accuracy", "1x1", "2x2"}  # 2x2: one digit longer than training
    # fp32 ONNX decodes what PyTorch decodes (at most a near-tie apart).
    assert abs(metrics(project, "fp32.json")["arithmetic"]["accuracy"] - torch_m["accuracy"]) <= 1 / torch_m["problems"]
    summary = metrics(project, "compare.json")
    fp32, int8 = metrics(project, "fp32.json")["arithmetic"], metrics(project, "int8.json")["arithmetic"]
    assert summary["int8_minus_fp32"]["arithmetic_accuracy"] == pytest.approx(int8["accuracy"] - fp32["accuracy"])
    assert "arithmetic_accuracy_longer" in summary["int4_minus_fp32"]
    # The samples report shows the held-out accuracy, not a spelling rate of equations.
    samples = (project / load_params(project / "params.yaml").evaluate.samples).read_text(encoding="utf-8")
    assert f"| held-out accuracy (exact answers) | | {torch_m['accuracy']:.1%} |" in samples
    assert "spelling" not in samples


def test_chargen_generate_answers_and_stops_at_the_end_of_the_equation(project):
    p = load_params(project / "params.yaml")
    model = project / p.export.model_dir / "model.fp32.onnx"
    train_line = (project / p.download.out_dir / "arithmetic" / "train.txt").read_text().splitlines()[0]
    prompt, reference = train_line.split("=")
    done = subprocess.run([sys.executable, "-m", "chargen", "generate", f"{prompt}=", "--top-k", "1",
                           "--new-document", "-m", str(model)],
                          env=stage_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == reference  # a problem it trained on, answered and ended with end-of-text


def run_benchmark(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=300, check=False)


def test_failure_benchmark_breaks_accuracy_down_by_carries_and_digits(project):
    done = run_benchmark("arithmetic", "--params", "params.yaml", "--precision", "int8", cwd=project)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["answer"] == "reversed" and result["model"] == "int8"
    cell = result["add"]["1x1"]
    assert set(cell) == {"accuracy", "problems", "by_carries", "digit_accuracy", "wrong_examples"}
    assert sum(c["problems"] for c in cell["by_carries"].values()) == cell["problems"]
    assert set(cell["by_carries"]) <= {"0", "1"} and set(cell["digit_accuracy"]) <= {"1", "2"}
    missing = run_benchmark("arithmetic", "--params", "params.yaml", "--model", "none.onnx", cwd=project)
    assert missing.returncode != 0 and "none.onnx does not exist" in missing.stderr


def test_recipe_benchmark_trains_the_recipe_with_a_changed_answer_format(project):
    done = run_benchmark("recipe", "--params", "params.yaml", "train.max_steps=3",
                         "download.sources.0.arithmetic.answer=plain", cwd=project)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["steps"] == 3 and 0 <= result["arithmetic"]["accuracy"] <= 1 and "1x1" in result["arithmetic"]["add"]
    assert result["command"].startswith("python -m benchmarks.recipe train.max_steps=3")
    for bad, says in (("download.sources.5.arithmetic.seed=1", "has no 'download.sources.5'"),
                      ("train.nope.deeper=1", "has no 'train.nope'"),
                      ("download.sources.0.arithmetic.nope=1", "unknown parameter")):
        failed = run_benchmark("recipe", "--params", "params.yaml", bad, cwd=project)
        assert failed.returncode != 0 and says in failed.stderr and "Traceback" not in failed.stderr


# --------------------------------------------------------------------------- the recipe as a DVC project

RECIPE_FILES = ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", "base/README.md")


def test_the_recipe_is_a_dvc_project_the_root_project_does_not_see(tmp_path):
    """Real DVC in a copy of the two projects' files: the root project's stages are its own
    dvc.yaml's only, and the recipe's folder lists exactly the recipe's stages."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    for name in ("dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore",
                 *(f"recipes/arithmetic/{f}" for f in RECIPE_FILES)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    recipe = tmp_path / "recipes" / "arithmetic"

    def stage_names(listing: str) -> set[str]:
        return {line.split()[0] for line in listing.splitlines() if line.strip()}

    root_stages, recipe_stages = dvc(tmp_path, "stage", "list"), dvc(recipe, "stage", "list")
    expected = {"download", "encode", "train", "evaluate", "export", "quantize", "report",
                *(f"compare@{p}" for p in PRECISIONS)}
    assert stage_names(root_stages) == expected and "recipes/" not in root_stages
    assert stage_names(recipe_stages) == expected
    # Every recipe stage writes inside the recipe's folder (paths shown relative to the repository root's copy).
    assert all("recipes/arithmetic/" in line for line in recipe_stages.splitlines() if line.strip())
    # Nothing has run: each project reports its own stages as changed, never the other's.
    assert "recipes/arithmetic" not in dvc(tmp_path, "status")
    assert "stages/download.py" in dvc(recipe, "status")
