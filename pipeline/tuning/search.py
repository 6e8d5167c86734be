"""The search: an Optuna study whose every trial is a DVC experiment.

Search trials run at the short budget of ``short_run`` and report their validation-loss
curve to a median pruner, which stops the weak ones early; TPE proposes the next
trial from the finished ones. The best ``confirm`` search trials are then re-run at
params.yaml's own budget in a second study, ``<study>-full``, since a short run's
winner can lose at full length. The first trial of a new study is params.yaml itself
(when it lies in the space), the reference every other trial is measured against.

Both studies live in one storage (an SQLAlchemy URL: an SQLite file by default, a
PostgreSQL or MySQL database to share one search between machines). A trial counts
once it is complete or pruned; ``--trials N`` runs until the study holds N of them,
so running the same command again continues an interrupted search. A trial cut short
by Ctrl-C is run again (with the same parameters) by the next invocation; one whose
process was killed is failed by the next worker once its heartbeat has been silent
for ``GRACE_S`` seconds, and run again likewise.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.params import ParamsError
from pipeline.tuning.config import TuneConfig, TuneError, Value
from pipeline.tuning.experiment import (
    ExperimentRun,
    experiment_names,
    read_metric,
    rename_experiment,
)

HEARTBEAT_S = 20  # a running trial's worker writes a heartbeat this often...
GRACE_S = 60  # ...and one silent this long is failed (and retried) by the next worker
POLL_S = 1.0  # how often the running experiment's curve is read
PRUNED_SUFFIX = "-pruned"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials --trials counts


class TrialFailed(Exception):
    """A trial that could not produce its metric (invalid combination, failed stage)."""


# --------------------------------------------------------------------------- storage and studies


def open_storage(url: str) -> Any:
    """The Optuna RDB storage at ``url`` (tables created when new), with heartbeats."""
    import sqlalchemy

    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: the message below says so
        shown = url
    engine_kwargs = {}
    try:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for a busy writer, do not fail
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are marked experimental
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, heartbeat_stale_trial_callback=retry)
    except ImportError:
        raise TuneError(f"storage {shown}: its database driver is not installed "
                        "(for PostgreSQL: pip install 'psycopg[binary]' and use postgresql+psycopg://)") from None
    except Exception as e:  # SQLAlchemy's errors for a bad URL, host, password or file; OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneError(f"storage {shown}: cannot open it ({first})") from None


def open_study(storage: Any, name: str, cfg: TuneConfig, sampler: Any, pruner: Any) -> Any:
    study = optuna.create_study(storage=storage, study_name=name, direction=cfg.settings.direction,
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != cfg.settings.direction:
        raise TuneError(f"study {name} in the storage maximises/minimises the other way: "
                        f"keep direction: {study.direction.name.lower()} or choose another study name")
    return study


def search_study(storage: Any, cfg: TuneConfig) -> Any:
    s = cfg.settings
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=s.pruning.startup_trials,
                                          n_warmup_steps=s.pruning.warmup_steps)
              if s.pruning else optuna.pruners.NopPruner())
    done = len(optuna.load_study(study_name=s.study, storage=storage).trials) if s.study in study_names(storage) else 0
    # A fixed seed would replay the same proposals after a restart: offset it by the trials so far.
    sampler = optuna.samplers.TPESampler(seed=s.seed + done, n_startup_trials=s.startup_trials)
    return open_study(storage, s.study, cfg, sampler, pruner)


def full_study(storage: Any, cfg: TuneConfig) -> Any:
    # Every trial of this study is enqueued: the sampler never proposes anything.
    return open_study(storage, f"{cfg.settings.study}-full", cfg, optuna.samplers.RandomSampler(),
                      optuna.pruners.NopPruner())


def study_names(storage: Any) -> set[str]:
    return {s.study_name for s in storage.get_all_studies()}


# --------------------------------------------------------------------------- retries


def retry(study: Any, trial: Any) -> None:
    """Enqueue a failed-by-interruption trial's parameters once more (a heartbeat callback too)."""
    if trial.params and not any(t.user_attrs.get("retry_of") == trial.number for t in study.trials):
        study.enqueue_trial(trial.params, user_attrs={**_carried(trial), "retry_of": trial.number})


def retry_interrupted(study: Any) -> None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.user_attrs.get("interrupted"):
            retry(study, trial)


def _carried(trial: Any) -> dict[str, Any]:
    return {k: v for k, v in trial.user_attrs.items() if k in ("confirms", "baseline")}


def finished(study: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


# --------------------------------------------------------------------------- one trial


@dataclass
class Trial:
    """What one trial runs: its experiment's name and params overrides, and whether the
    pruner may stop it."""

    name: str
    overrides: dict[str, Value]
    prune: bool


def run_trial(cfg: TuneConfig, trial: Any, spec: Trial, log_dir: Path) -> float:
    """Run ``spec`` as a DVC experiment for the Optuna ``trial``; its metric value, or
    TrialPruned / TrialFailed."""

    try:
        params = cfg.trial_params(spec.overrides)
    except ParamsError as e:
        trial.set_user_attr("error", str(e))
        raise TrialFailed(f"invalid combination: {e}") from None
    searched = {d.key: spec.overrides[d.key] for d in cfg.space}
    print(f"[trial {trial.number}] {spec.name}: {format_params(searched)}", flush=True)
    trial.set_user_attr("experiment", spec.name)
    run = ExperimentRun(spec.name, cfg.settings.stage, spec.overrides, params.train.live_dir,
                        log_dir / f"{spec.name}.log")
    reported: dict[int, float] = {}
    try:
        while run.poll() is None:
            for step, value in run.curve_rows():
                reported[step] = value
                trial.report(value, step)
                print(f"[trial {trial.number}]   step {step:>6}  val/loss {value:.4f}", flush=True)
                if spec.prune and not run.stop_sent and trial.should_prune() and run.request_stop():
                    print(f"[trial {trial.number}]   pruned: stopping the experiment at step ~{step}", flush=True)
            time.sleep(POLL_S)
        code = run.wait()
    except KeyboardInterrupt:
        run.interrupt()
        trial.set_user_attr("interrupted", True)
        raise
    if code != 0:
        trial.set_user_attr("error", run.tail())
        raise TrialFailed(f"dvc exp run failed ({run.tail()}); log: {run.log}")
    if run.stop_sent:
        rename_experiment(spec.name, spec.name + PRUNED_SUFFIX)
        trial.set_user_attr("experiment", spec.name + PRUNED_SUFFIX)
        last = max(reported)
        raise optuna.TrialPruned(f"at step {last}, val/loss {reported[last]:.4f}")
    return read_metric(cfg.metric_file, cfg.metric_key, spec.name)


def format_params(params: dict[str, Value]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# --------------------------------------------------------------------------- the two phases


def run_search(cfg: TuneConfig, study: Any, trials: int, deadline: float | None) -> None:
    """Run search trials until the study holds ``trials`` finished ones (or time is up)."""
    s = cfg.settings
    if not study.trials:
        check_names_free(s.study)
        enqueue_baseline(study, cfg)
    retry_interrupted(study)
    left = trials - finished(study)
    print(f"study {s.study}: {finished(study)} of {trials} search trials finished", flush=True)
    if left <= 0:
        return
    log_dir = Path(s.out_dir) / "logs"

    def objective(trial: optuna.Trial) -> float:
        overrides = {d.key: d.suggest(trial) for d in cfg.space}
        spec = Trial(f"{s.study}-{trial.number:03d}", {**overrides, **cfg.short_run}, prune=s.pruning is not None)
        return run_trial(cfg, trial, spec, log_dir)

    study.optimize(objective, n_trials=left, timeout=_seconds_left(deadline), catch=(TrialFailed,),
                   callbacks=[optuna.study.MaxTrialsCallback(trials, states=COUNTED), report_trial])


def run_confirmation(cfg: TuneConfig, study: Any, search: Any, k: int, deadline: float | None) -> None:
    """Re-run the ``k`` best search trials at params.yaml's own budget (each once)."""
    retry_interrupted(study)
    confirmed = {t.user_attrs.get("confirms") for t in study.trials}
    for t in top_trials(search, k):
        if t.number not in confirmed:
            study.enqueue_trial(t.params, user_attrs={"confirms": t.number})
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if not waiting:
        return
    print(f"confirming at full budget: {waiting} run(s)", flush=True)
    log_dir = Path(cfg.settings.out_dir) / "logs"

    def objective(trial: optuna.Trial) -> float:
        overrides = {d.key: d.suggest(trial) for d in cfg.space}
        source = trial.user_attrs["confirms"]
        return run_trial(cfg, trial, Trial(f"{cfg.settings.study}-full-{source:03d}", overrides, prune=False), log_dir)

    timeout = _seconds_left(deadline)
    if timeout is None or timeout > 0:
        study.optimize(objective, n_trials=waiting, timeout=timeout, catch=(TrialFailed,), callbacks=[report_trial])


def top_trials(study: Any, k: int) -> list[Any]:
    """The ``k`` best complete trials, best first, one per distinct set of parameters."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1 if study.direction.name == "MINIMIZE" else -1
    best, seen = [], []
    for t in sorted(done, key=lambda t: sign * t.value):
        if t.params not in seen:
            seen.append(t.params)
            best.append(t)
    return best[:k]


def enqueue_baseline(study: Any, cfg: TuneConfig) -> None:
    """params.yaml's own values as the first trial, when they lie in the space."""
    current = {d.key: cfg.params[d.key.split(".")[0]][d.key.split(".")[1]] for d in cfg.space}
    if all(d.contains(current[d.key]) for d in cfg.space):
        study.enqueue_trial(current, user_attrs={"baseline": True})


def check_names_free(study_name: str) -> None:
    """A new study numbers its trials from 0: experiments of an earlier study of the same
    name on this commit would clash with them."""
    clash = sorted(n for n in experiment_names() if n.startswith(f"{study_name}-"))
    if clash:
        raise TuneError(f"experiments named {study_name}-* already exist on this commit ({clash[0]}, ...), "
                        f"but the study is new: set another study name in tune.yaml or remove them "
                        f"(dvc exp remove {' '.join(clash[:3])}{' ...' if len(clash) > 3 else ''})")


def report_trial(study: Any, trial: Any) -> None:
    """One line per finished trial: its outcome, time, and the best so far."""
    took = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0.0
    head = f"[trial {trial.number}] {trial.user_attrs.get('experiment', '')}"
    if trial.state == TrialState.COMPLETE:
        best = study.best_trial
        print(f"{head}: {trial.value:.4f} in {took:.0f} s (best {best.value:.4f}, trial {best.number})", flush=True)
    elif trial.state == TrialState.PRUNED:
        print(f"{head}: pruned in {took:.0f} s", flush=True)
    else:
        print(f"{head}: failed ({trial.user_attrs.get('error', 'see its log')})", flush=True)


def _seconds_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
