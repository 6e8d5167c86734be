"""The hyperparameter search: a real Optuna study (SQLite) whose trials are real `dvc exp run`s
of a tiny model on a tiny corpus in a throwaway git+DVC project.

One study goes through everything: a complete trial, a trial the pruner stops (recorded as
pruned, its experiment kept), a search killed with SIGKILL mid-trial and restarted (no finished
trial is repeated), the confirmation at full budget, `dvc exp show` listing every trial and
`dvc exp apply` bringing the winner into a workspace the search left alone. Bad search
settings are one-line errors before any trial starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from dvcproject import dvc, dvc_env, make_dvc_project
from optuna.trial import TrialState

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}
TINY_TRAIN = {"max_steps": 30, "batch_size": 4, "lr": 1.0e-2, "min_lr": 1.0e-5, "warmup_steps": 0,
              "eval_interval": 10, "eval_windows": 4, "checkpoint_interval": 30, "log_interval": 10,
              "threads": 1, "dtype": "float32"}
DOCS = {f"doc{i}.txt": "the cat sat on the mat. the dog sat on the log.\n" * 20 for i in range(2)}
STORAGE = "sqlite:///tuning/study.db"
# A search trial's length. The tiny model trains about 300 steps a second, and the search reads
# the curve once a second: a trial must last several seconds past its first evaluations for the
# pruner's stop to land before training ends, on fast machines too.
SHORT_STEPS = 2000
TUNE = {
    "study": "t", "storage": STORAGE, "stage": "evaluate", "metric": "metrics/eval.json:val_loss",
    "direction": "minimize", "trials": 3, "seed": 0, "startup_trials": 5, "confirm": 1,
    "short_run": {"train.max_steps": SHORT_STEPS, "train.eval_interval": 20,
                  "train.checkpoint_interval": SHORT_STEPS},
    "pruning": {"startup_trials": 1, "warmup_steps": 10},
    "out_dir": "tuning",
    "space": {"train.lr": {"low": 1.0e-5, "high": 3.0e-2, "log": True},
              "train.weight_decay": {"choices": [0.0, 0.1]}},
}
GOOD = {"train.lr": 1.0e-2, "train.weight_decay": 0.1}
BAD = {"train.lr": 1.0e-5, "train.weight_decay": 0.1}  # barely learns: pruned against GOOD


def tiny(params: dict) -> None:
    params["model"].update(TINY_MODEL)
    params["train"].update(TINY_TRAIN)
    params["sample"].update(num_samples=1, chars=20)
    params["evaluate"]["batch_size"] = 16


def project(root: Path, **tune: object) -> Path:
    repo = make_dvc_project(root, DOCS, tiny, commit=True)
    (repo / "tune.yaml").write_text(yaml.safe_dump({**TUNE, **tune}, sort_keys=False), encoding="utf-8")
    with (repo / ".gitignore").open("a", encoding="utf-8") as f:
        f.write("/tuning/study.db\n/tuning/logs\n")
    return repo


def tuner(repo: Path, *args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.tuning", *args], cwd=repo, env=dvc_env(repo),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def load(repo: Path, name: str = "t") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{repo / 'tuning' / 'study.db'}")


def experiment_processes(repo: Path, stage: str = "") -> list[psutil.Process]:
    """Processes working in the project's experiment copies (.dvc/tmp/exps), of ``stage`` if given."""
    found = []
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        cwd, cmdline = proc.info["cwd"] or "", " ".join(proc.info["cmdline"] or [])
        if cwd.startswith(str(repo / ".dvc" / "tmp" / "exps")) and f"stages.{stage}" in cmdline:
            found.append(proc)
    return found


def experiment_params(repo: Path) -> dict[str, dict]:
    """Every experiment `dvc exp show --json` lists: name -> (train.lr, its metrics)."""
    rows = json.loads(dvc(repo, "exp", "show", "--json"))
    found = {}
    for baseline in rows:
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            params = data["params"]["params.yaml"]["data"]
            found[exp["name"]] = {"lr": params["train"]["lr"], "max_steps": params["train"]["max_steps"],
                                  "metrics": data["metrics"]["metrics/eval.json"]["data"]}
    return found


def test_a_study_of_dvc_experiments_prunes_resumes_confirms_and_applies(tmp_path: Path) -> None:
    repo = project(tmp_path / "project")
    workspace = {p: (repo / p).read_bytes() for p in ("params.yaml", "dvc.yaml")}
    (repo / "tuning").mkdir()
    study = optuna.create_study(study_name="t", storage=f"sqlite:///{repo / 'tuning' / 'study.db'}",
                                direction="minimize")
    study.enqueue_trial(GOOD)
    study.enqueue_trial(BAD)

    # First run: trial 0 completes, trial 1 is pruned, then the search is killed during trial 2.
    first = tuner(repo, "--confirm", "0")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if len(load(repo).trials) == 3 and experiment_processes(repo, "train"):
            break
        time.sleep(0.3)
    assert first.poll() is None, first.communicate()[0]
    first.kill()
    out_first = first.communicate()[0]
    # The killed search's experiment dies with it (its output pipe is gone).
    deadline = time.monotonic() + 60
    while experiment_processes(repo) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not experiment_processes(repo)

    states = {t.number: t.state for t in load(repo).trials}
    assert states[0] == TrialState.COMPLETE and states[1] == TrialState.PRUNED, out_first
    assert states[2] == TrialState.RUNNING  # its heartbeat has not gone stale yet

    # Restart: the finished trials are kept, one more runs, then the best is confirmed at full budget.
    out = finish(tuner(repo))
    assert "0 of 3" not in out and "2 of 3 search trials finished" in out
    trials = load(repo).trials
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert [t.number for t in done] == [0, 1, 3]
    assert len({tuple(sorted(t.params.items())) for t in done}) == 3  # no finished trial repeated
    pruned = trials[1]
    assert pruned.user_attrs["experiment"] == "t-001-pruned" and max(pruned.intermediate_values) < SHORT_STEPS
    full = load(repo, "t-full").trials
    assert [t.state for t in full] == [TrialState.COMPLETE] and full[0].user_attrs["confirms"] == 0

    # Every trial is a DVC experiment with its params and metrics.
    exps = experiment_params(repo)
    assert {t.user_attrs["experiment"] for t in done} | {"t-full-000"} <= set(exps)
    assert exps["t-000"]["lr"] == GOOD["train.lr"] and exps["t-000"]["max_steps"] == SHORT_STEPS
    assert exps["t-001-pruned"]["metrics"]["step"] < SHORT_STEPS  # training stopped early, evaluated, recorded
    assert exps["t-full-000"]["max_steps"] == TINY_TRAIN["max_steps"]
    assert exps["t-full-000"]["metrics"]["val_loss"] == pytest.approx(full[0].value)

    # The summary files, and a workspace the trials left alone.
    summary = json.loads((repo / "tuning" / "summary.json").read_text(encoding="utf-8"))
    assert summary["winner"]["experiment"] == "t-full-000" and summary["trials"]["pruned"] >= 1
    rows = json.loads((repo / "tuning" / "params" / "train.lr.json").read_text(encoding="utf-8"))
    assert sorted(r["trial"] for r in rows) == [t.number for t in done if t.state == TrialState.COMPLETE]
    assert "apply it with: dvc exp apply t-full-000" in out
    assert {p: (repo / p).read_bytes() for p in workspace} == workspace
    assert not (repo / "checkpoints").exists() and not (repo / "metrics" / "eval.json").exists()

    dvc(repo, "exp", "apply", "t-full-000")
    applied = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    assert applied["train"]["lr"] == GOOD["train.lr"]
    metrics = json.loads((repo / "metrics" / "eval.json").read_text(encoding="utf-8"))
    assert metrics["val_loss"] == pytest.approx(full[0].value)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def plain_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = project(tmp_path_factory.mktemp("bad") / "project")
    (repo / "metrics").mkdir()
    (repo / "metrics" / "eval.json").write_text(json.dumps({"val_loss": 2.0, "test_loss": 2.1}))
    return repo


@pytest.mark.parametrize(("edit", "expected"), [
    ({"space": {"train.lrr": {"low": 1e-3, "high": 1e-2}}}, "unknown parameter 'train.lrr' (known in train:"),
    ({"space": {"optim.lr": {"low": 1e-3, "high": 1e-2}}}, "unknown parameter 'optim.lr'"),
    ({"space": {"train.lr": {"low": 1e-2, "high": 1e-3}}}, "empty range (low 0.01 must be below high 0.001)"),
    ({"space": {"train.lr": {"low": 0.0, "high": 1e-3}}}, "is not a valid train.lr"),
    ({"space": {"model.mlp": {"choices": []}}}, "choices must be a non-empty list"),
    ({"metric": "metrics/eval.json:val_losss"}, "metric 'metrics/eval.json:val_losss' does not exist"),
    ({"metric": "metrics/nope.json:val_loss"}, "metric 'metrics/nope.json:val_loss' does not exist"),
    ({"storage": "notadb://host/x"}, "storage notadb://host/x: cannot open it"),
    ({"storage": "sqlite:///tune.yaml/study.db"}, "storage sqlite:///tune.yaml/study.db: cannot open it"),
])
def test_bad_search_settings_are_one_line_errors_before_any_trial(plain_project: Path, edit: dict,
                                                                   expected: str) -> None:
    config = plain_project / "bad.yaml"
    config.write_text(yaml.safe_dump({**TUNE, **edit}), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "pipeline.tuning", "--config", config.name], cwd=plain_project,
                          env=dvc_env(plain_project), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and not (plain_project / "tuning" / "logs").exists()


def test_pruned_training_stops_cleanly_on_sigusr1(tmp_path: Path) -> None:
    """The stop the pruner sends: training ends at the step it reached, checkpointed, exit 0."""
    if not hasattr(signal, "SIGUSR1"):
        pytest.skip("no SIGUSR1 on this platform")
    from conftest import stage_env, tiny_tokenizer, write_encoded

    from pipeline.training.checkpoint import load_checkpoint

    write_encoded(tmp_path / "data" / "encoded", tiny_tokenizer())
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text(encoding="utf-8"))
    tiny(params)
    params["train"].update(max_steps=100000, eval_interval=20)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=tmp_path, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    curve = tmp_path / "dvclive" / "plots" / "metrics" / "val" / "loss.tsv"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(_lines(curve)) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "(stopped early on request)" in out
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert 20 <= last["step"] < 100000
    assert int(_lines(curve)[-1].split("\t")[0]) == last["step"]  # validated at the step it stopped


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
