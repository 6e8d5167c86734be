"""The train stage: loss falls, checkpoints resume after kill -9, changed params restart, errors are clean."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import project_params, stage_env, tiny_tokenizer, write_encoded
from dvcproject import BIN, dvc, dvc_env, make_dvc_project

from pipeline.model import GPT
from pipeline.params import TrainParams
from pipeline.training.checkpoint import load_checkpoint, load_model

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
TINY_TRAIN = {
    "max_steps": 40, "batch_size": 8, "lr": 1.0e-2, "min_lr": 1.0e-3, "warmup_steps": 5,
    "eval_interval": 20, "eval_windows": 16, "checkpoint_interval": 10, "log_interval": 5,
    "threads": 1, "dtype": "float32",
}


def make_project(root: Path, **train: object) -> Path:
    """A project dir with tiny encoded data and a params.yaml for a tiny model."""
    write_encoded(root / "data" / "encoded", tiny_tokenizer())
    write_params(root, **train)
    return root


def write_params(root: Path, **train: object) -> None:
    params = project_params()
    params["model"].update(TINY_MODEL)
    params["train"].update({**TINY_TRAIN, **train})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def train_params(**train: object) -> TrainParams:
    return TrainParams(**{**project_params()["train"], **train})


def train_cmd() -> list[str]:
    return [sys.executable, "-m", "stages.train", "--params", "params.yaml"]


def kill_once_checkpointed(project: Path, max_steps: int) -> int:
    """Start training in ``project``, SIGKILL it once it has written last.pt, and return
    the step saved there (skip the test when the run finished first)."""
    last = project / "checkpoints" / "last.pt"
    proc = subprocess.Popen(train_cmd(), cwd=project, env=stage_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved_step = load_checkpoint(last)["step"]
    if saved_step >= max_steps:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    return saved_step


def run_train(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(), cwd=project, env=stage_env(), capture_output=True, text=True,
                          timeout=300, check=False)


def curve(project: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) rows dvclive wrote for one metric."""
    with (project / "dvclive" / "plots" / "metrics" / f"{name}.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    key = name.split("/")[-1]
    return [(int(r["step"]), float(r[key])) for r in rows]


def test_loss_falls_and_outputs_are_written(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    r = run_train(project)
    assert r.returncode == 0, r.stderr
    val = curve(project, "val/loss")
    assert [s for s, _ in val] == [0, 20, 40]
    assert val[-1][1] < val[0][1] - 0.5  # a tiny model learns a repetitive text fast
    train = curve(project, "train/loss")
    assert train[-1][1] < train[0][1]
    assert {s for s, _ in curve(project, "lr")} == {s for s, _ in train}

    model, tokenizer, info = load_model(project / "checkpoints" / "best.pt")
    assert isinstance(model, GPT) and not model.training
    assert tokenizer == tiny_tokenizer() and tokenizer.size == model.cfg.vocab_size
    assert info["step"] == 40 and info["best_val_loss"] == pytest.approx(val[-1][1])
    last = load_checkpoint(project / "checkpoints" / "last.pt")
    assert {"optimizer", "ema", "rng"} <= set(last)
    summary = json.loads((project / "dvclive" / "metrics.json").read_text())
    assert summary["train_seconds"] > 0  # times live with the curves, not in the checkpoint metrics
    # dvc.yaml stays hand-written: dvclive must not create one.
    assert not (project / "dvc.yaml").exists() and not (project / "dvclive" / "dvc.yaml").exists()


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Muon's momentum and the weight average (from step 15 on) must survive the kill too.
    steps = {"max_steps": 300, "checkpoint_interval": 25, "eval_interval": 100,
             "optimizer": "muon", "muon_lr": 0.02, "ema": 0.9, "decay_frac": 0.95}
    straight = make_project(tmp_path / "straight", **steps)
    assert run_train(straight).returncode == 0

    killed = make_project(tmp_path / "killed", **steps)
    saved_step = kill_once_checkpointed(killed, steps["max_steps"])

    r = run_train(killed)
    assert r.returncode == 0, r.stderr
    assert f"resuming from checkpoints/last.pt at step {saved_step}/300" in r.stdout
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert b["step"] == 300
    # Same batches, same optimizer state: the resumed run ends with the same weights.
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    steps_logged = [s for s, _ in curve(killed, "train/loss")]
    assert steps_logged == sorted(set(steps_logged)), "a resumed run must not log a step twice"


def test_changed_params_start_fresh(tmp_path: Path) -> None:
    project = make_project(tmp_path, max_steps=20)
    assert run_train(project).returncode == 0
    r = run_train(project)  # unchanged and finished: nothing left to do
    assert r.returncode == 0 and "resuming" in r.stdout
    write_params(project, max_steps=20, lr=5e-3)
    r = run_train(project)
    assert r.returncode == 0, r.stderr
    assert "starting a fresh run" in r.stdout
    assert curve(project, "val/loss")[0][0] == 0  # curves start over too
    assert load_checkpoint(project / "checkpoints" / "last.pt")["params"]["train"]["lr"] == 5e-3


def test_non_finite_loss_stops_with_the_step(tmp_path: Path) -> None:
    # An absurd learning rate blows the weights up within a couple of steps.
    project = make_project(tmp_path, lr=1e30, min_lr=1.0, warmup_steps=0)
    r = run_train(project)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: training loss became non-finite") and "at step " in err
    assert not (project / "checkpoints" / "best.pt").exists()


def test_a_failing_fresh_run_keeps_the_previous_checkpoints(tmp_path: Path) -> None:
    project = make_project(tmp_path, max_steps=20)
    assert run_train(project).returncode == 0
    before = {name: (project / "checkpoints" / name).read_bytes() for name in ("best.pt", "last.pt")}
    write_params(project, max_steps=20, lr=1e30, min_lr=1.0, warmup_steps=0)
    r = run_train(project)
    assert r.returncode == 1 and "starting a fresh run" in r.stdout
    assert {name: (project / "checkpoints" / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("lr", [".inf", ".nan"])
def test_a_non_finite_learning_rate_is_refused_before_anything_runs(tmp_path: Path, lr: str) -> None:
    project = make_project(tmp_path)
    text = (project / "params.yaml").read_text().replace("lr: 0.01\n", f"lr: {lr}\n")
    (project / "params.yaml").write_text(text)
    r = run_train(project)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: train.lr: must be a finite number, got {float(lr[1:] if lr != '.nan' else 'nan')!r}"
    assert not (project / "checkpoints").exists()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    (project / "checkpoints").mkdir()
    (project / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    r = run_train(project)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "corrupt or not a chargen checkpoint" in r.stderr and "delete it" in r.stderr


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    write_params(tmp_path)
    r = run_train(tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "encode" in r.stderr


# ----------------------------------------------------------------------------- under DVC

def test_dvc_repro_resumes_after_ctrl_c_and_keeps_dvc_yaml(tmp_path: Path) -> None:
    def tiny(params: dict) -> None:
        params["model"].update(TINY_MODEL)
        params["train"].update({**TINY_TRAIN, "max_steps": 400, "checkpoint_interval": 10, "eval_interval": 200})
        params["sample"].update(num_samples=2, chars=60)

    docs = {f"doc{i}.txt": "the cat sat on the mat. the dog sat on the log.\n" * 30 for i in range(3)}
    repo = make_dvc_project(tmp_path / "project", docs, tiny, commit=True)
    dvc(repo, "repro", "encode")
    dvc_yaml = (repo / "dvc.yaml").read_bytes()

    # Ctrl-C reaches the whole foreground process group, as in a terminal.
    last = repo / "checkpoints" / "last.pt"
    log = (tmp_path / "repro.log").open("w")
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "train"], cwd=repo, env=dvc_env(repo),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, (tmp_path / "repro.log").read_text()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    saved_step = load_checkpoint(last)["step"]
    if saved_step >= 400:
        pytest.skip("training finished before it could be interrupted")

    out = dvc(repo, "repro", "evaluate")
    assert f"resuming from checkpoints/last.pt at step {saved_step}/400" in out
    assert (repo / "dvc.yaml").read_bytes() == dvc_yaml  # dvclive left it alone
    assert load_checkpoint(last)["step"] == 400
    assert json.loads((repo / "metrics" / "eval.json").read_text())["step"] in (200, 400)  # best.pt
    assert "test_loss" in dvc(repo, "metrics", "show")
    loss = json.loads(dvc(repo, "plots", "show", "--json", "loss"))["data"]["loss"][0]["content"]
    rows = loss["data"]["values"]  # train and validation loss, overlaid on one chart
    assert {r["filename"] for r in rows} == {"train/loss.tsv", "val/loss.tsv"}
    assert {int(r["step"]) for r in rows if r["filename"] == "val/loss.tsv"} == {0, 200, 400}
    again = dvc(repo, "repro", "evaluate")
    assert "Running stage" not in again
