"""One trial as one DVC experiment: ``dvc exp run --temp --name NAME -S key=value ... STAGE``.

``--temp`` runs the experiment in a copy of the repository under ``.dvc/tmp/exps`` (HEAD
plus the workspace's uncommitted changes, outputs checked out from the shared cache),
so the workspace — params.yaml, dvc.lock, metrics, models, checkpoints — stays as it
is while trials run; DVC commits each finished experiment to a Git ref, where
``dvc exp show`` lists it and ``dvc exp apply`` brings it into the workspace.

While a trial trains, its validation-loss curve is read from the copy's dvclive files
(found through the executor info file DVC keeps for each running experiment, the one
``dvc exp show`` reads). A pruned trial is stopped with SIGUSR1 to its training
process: training ends at the step it reached and succeeds (``training/stop.py``), so
DVC still records the experiment. Ctrl-C reaches the experiment as SIGINT: training
stops, DVC records nothing, and the copy is removed.

The experiment's output goes through a pipe to its log file: if the search process is
killed outright, the pipe breaks and the experiment ends at its next write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from pipeline.training.stop import STOP_SIGNAL
from pipeline.tuning.config import TuneError, Value
from pipeline.tuning.curve import CurveFollower

EXEC_INFO_GLOB = ".dvc/tmp/exps/run/*/*.run"  # DVC's record of each running experiment
VAL_CURVE = Path("plots", "metrics", "val", "loss.tsv")  # under train.live_dir (training/train.py)
TRAIN_MODULE = "stages.train"


def dvc_command() -> str:
    """The dvc of this Python environment (a venv's bin/), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    found = str(local) if local.exists() else shutil.which("dvc")
    if found is None:
        raise TuneError("dvc is not installed: pip install -e '.[pipeline]'")
    return found


def set_arg(key: str, value: Value) -> str:
    """A ``-S`` override; floats keep every digit, booleans are YAML's true/false."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)
    return f"{key}={text}"


class ExperimentRun:
    """A ``dvc exp run --temp`` in flight, its output copied to ``log``."""

    def __init__(self, name: str, stage: str, overrides: dict[str, Value], live_dir: str, log: Path) -> None:
        self.name, self.log, self.live_dir = name, log, live_dir
        self.stop_sent = False
        self._curve: CurveFollower | None = None
        cmd = [dvc_command(), "exp", "run", "--temp", "--name", name]
        for key, value in overrides.items():
            cmd += ["-S", set_arg(key, value)]
        log.parent.mkdir(parents=True, exist_ok=True)
        # A session of its own: Ctrl-C in the terminal reaches the search, which decides.
        self.proc = subprocess.Popen([*cmd, stage], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"},
                                     preexec_fn=_default_sigint)
        self._copier = threading.Thread(target=self._copy_output, daemon=True)
        self._copier.start()

    def _copy_output(self) -> None:
        with self.log.open("wb") as out:
            for line in iter(self.proc.stdout.readline, b""):
                out.write(line)
                out.flush()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        code = self.proc.wait()
        self._copier.join()
        return code

    def curve_rows(self) -> list[tuple[int, float]]:
        """New (step, validation loss) rows of the running training.

        The copy holds the baseline's committed curve until training rewrites it, so the
        file counts only once it has been written since the training process started."""
        if self._curve is None:
            root, train = running_root(self.name), self._train_process()
            if root is None or train is None:
                return []
            path = root / self.live_dir / VAL_CURVE
            try:
                fresh = path.stat().st_mtime > train.create_time()
            except (OSError, psutil.Error):
                fresh = False
            if not fresh:
                return []
            self._curve = CurveFollower(path)
        return self._curve.read()

    def request_stop(self) -> bool:
        """Ask the training process to end early and cleanly; False when none is running."""
        train = self._train_process()
        if STOP_SIGNAL is None or train is None:
            return False
        try:
            train.send_signal(STOP_SIGNAL)
        except psutil.Error:
            return False
        self.stop_sent = True
        return True

    def _train_process(self) -> psutil.Process | None:
        """The experiment's training stage process, while it runs."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return None
        for child in children:
            try:
                if TRAIN_MODULE in child.cmdline():
                    return child
            except psutil.Error:
                continue
        return None

    def interrupt(self, timeout: float = 60.0) -> None:
        """Ctrl-C for the experiment: SIGINT to its process group, SIGKILL if it lingers."""
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._copier.join(timeout=10.0)

    def tail(self, lines: int = 1) -> str:
        """The last non-empty lines of the log (progress bars' carriage returns resolved)."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        kept = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines()]
        return " | ".join([line for line in kept if line][-lines:])


def _default_sigint() -> None:
    # A search started in the background ignores SIGINT, and children inherit that: the
    # experiment must still stop on the SIGINT the search forwards.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def running_root(name: str) -> Path | None:
    """Where the running experiment ``name`` works, from DVC's executor info files."""
    for info in Path.cwd().glob(EXEC_INFO_GLOB):
        try:
            data = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being written
        if data.get("name") == name and data.get("root_dir"):
            return Path(data["root_dir"])
    return None


# --------------------------------------------------------------------------- the repository


def run_dvc(*args: str) -> str:
    """``dvc ARGS`` in the project; TuneError with DVC's last line when it fails."""
    done = subprocess.run([dvc_command(), *args], capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"}, check=False)
    if done.returncode != 0:
        last = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise TuneError(f"dvc {' '.join(args)} failed: {last[-1] if last else done.returncode}")
    return done.stdout


def experiment_names() -> set[str]:
    """Names of the experiments based on HEAD."""
    return {line.strip() for line in run_dvc("exp", "list", "--name-only").splitlines() if line.strip()}


def rename_experiment(old: str, new: str) -> None:
    run_dvc("exp", "rename", old, new)


def read_metric(file: str, key: str, experiment: str | None = None) -> float:
    """The number at ``key`` (dots reach into nested objects) of metrics ``file`` as the
    experiment ``experiment`` committed it, or in the workspace when None."""
    import yaml  # JSON is YAML too

    if experiment is None:
        text = Path(file).read_text(encoding="utf-8")
    else:
        text = git("show", f"{experiment_ref(experiment)}:{file}")
    data = yaml.safe_load(text)
    value: Any = data
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = ", ".join(sorted(_leaf_keys(data)))
            raise TuneError(f"metric '{file}:{key}' does not exist (the file has: {keys})")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TuneError(f"metric '{file}:{key}' is not a number ({value!r})")
    return float(value)


def experiment_ref(name: str) -> str:
    """The Git ref DVC keeps experiment ``name`` under (refs/exps/<baseline>/<name>),
    the one based on HEAD when several baselines have one of that name."""
    head = git("rev-parse", "HEAD").strip()
    refs = [r for r in git("for-each-ref", "--format=%(refname)", "refs/exps/").split() if r.endswith(f"/{name}")]
    on_head = [r for r in refs if r.startswith(f"refs/exps/{head[:2]}/{head[2:]}/")]
    if not refs:
        raise TuneError(f"experiment {name}: DVC recorded no such experiment")
    return (on_head or refs)[0]


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TuneError(f"git {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return done.stdout


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return [prefix]
    return [k for name, v in data.items() for k in _leaf_keys(v, f"{prefix}{name}.") ] if data else []


def check_project(stage: str, metric_file: str, metric_key: str) -> None:
    """Before any trial: a Git commit to base experiments on, ``stage`` in dvc.yaml, and the
    metric a metrics output of it (or of a stage before it), present in the workspace's
    copy of the file when there is one."""
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, check=False)
    if head.returncode != 0:
        raise TuneError("experiments are based on a Git commit and this repository has none: commit first")
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            stages = repo.stage.collect(stage, with_deps=True)
            declared = sorted({str(out.def_path) for s in stages for out in s.outs if out.metric})
            cached = {str(out.def_path) for s in stages for out in s.outs if out.metric and out.use_cache}
    except DvcException as e:
        raise TuneError(f"tune.stage: cannot run '{stage}' ({str(e).splitlines()[0]})") from None
    if metric_file not in declared:
        raise TuneError(f"metric '{metric_file}:{metric_key}' does not exist: {metric_file} is not a metrics "
                        f"file of stage '{stage}' or those before it ({', '.join(declared) or 'none'})")
    if metric_file in cached:
        raise TuneError(f"metric file {metric_file} is cached by DVC: declare it with cache: false so that "
                        "each experiment's commit holds it")
    if Path(metric_file).exists():
        read_metric(metric_file, metric_key)
