"""The search's settings, ``tune.yaml``: what to search, how to score, where the study lives.

Everything is checked before the first trial starts: each searched parameter must be a
params.yaml key of the typed sections in ``pipeline/params.py`` (a number or a choice,
not a path or a list), every bound and choice must make a valid params.yaml on its own
(so ``train.lr: {low: 0, ...}`` fails here, not in the tenth trial), ranges must not be
empty and log scales must start above zero. A mistake is a :class:`TuneError` with one
line naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from chargen.errors import ChargenError
from pipeline.params import (
    Params,
    ParamsError,
    Positive,
    Section,
    build,
    load_params,
    read_yaml_mapping,
)

DEFAULT_CONFIG_PATH = Path("tune.yaml")
Value = bool | int | float | str  # what a searched parameter can hold (Optuna's choice types)


class TuneError(ChargenError):
    """tune.yaml (or the project it searches) cannot run a search as it stands."""


# --------------------------------------------------------------------------- one dimension


@dataclass(frozen=True)
class Dimension:
    """One searched params.yaml key: a range (``log``: sampled on a log scale, ``step``: a
    grid) or a list of choices."""

    key: str  # "section.field" in params.yaml
    kind: Literal["int", "float", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Value, ...] = ()

    def suggest(self, trial: Any) -> Value:
        """This dimension's value for an Optuna trial (a fixed value when the trial was enqueued)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            return False
        return self.step is None or math.isclose((value - self.low) / self.step, round((value - self.low) / self.step))


# --------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class PruningSettings(Section):
    """Median pruning of the short runs from the validation-loss curve."""

    _prefix = "pruning"

    startup_trials: int  # finished trials before any trial is pruned
    warmup_steps: int  # training steps before a trial may be pruned


@dataclass(frozen=True)
class TuneSettings(Section):
    """tune.yaml's scalar settings (``space`` and ``short_run`` are read beside them)."""

    _prefix = "tune"

    study: str  # the study's name in the storage; trial n becomes the experiment <study>-<n>
    storage: str  # an SQLAlchemy URL: sqlite:///tuning/study.db, postgresql+psycopg://...
    stage: str  # each trial runs `dvc exp run` of this stage and the ones before it
    metric: str  # FILE:KEY of a metrics file that stage writes; dots reach into nested keys
    direction: Literal["minimize", "maximize"]
    trials: Positive  # search trials (pruned ones count) when --trials is not given
    seed: int  # TPE's seed (offset by the trials already in the study, so a resumed search draws anew)
    startup_trials: Positive  # random trials before TPE starts modelling the space
    pruning: PruningSettings | None  # null: every trial runs its whole short budget
    confirm: int  # the best N search trials re-run at params.yaml's own (full) budget
    out_dir: str  # summary.json, importance.json, params/<key>.json and logs/

    def check(self) -> None:
        if not self.study.replace("-", "").replace("_", "").isalnum():
            # Experiment names are Git ref names: keep them plain.
            raise ParamsError(f"tune.study: {self.study!r} must be letters, digits, '-' or '_'")
        file, _, key = self.metric.partition(":")
        if not file or not key:
            raise ParamsError(f"tune.metric: expected FILE:KEY (e.g. metrics/eval.json:val_loss), got {self.metric!r}")
        if self.pruning is not None and self.direction == "maximize":
            raise ParamsError("tune.pruning: prunes on the validation loss, which is minimised; "
                              "set pruning: null to maximise a metric")


@dataclass(frozen=True)
class TuneConfig:
    settings: TuneSettings
    space: tuple[Dimension, ...]
    short_run: dict[str, Value]  # params overrides of every search trial (the short budget)
    params: dict[str, Any]  # params.yaml as read, the base every trial's overrides apply to

    @property
    def metric_file(self) -> str:
        return self.settings.metric.partition(":")[0]

    @property
    def metric_key(self) -> str:
        return self.settings.metric.partition(":")[2]

    def trial_params(self, overrides: dict[str, Value]) -> Params:
        """params.yaml with ``overrides`` applied, validated (ParamsError when they clash)."""
        return build(Params, with_overrides(self.params, overrides), "")


def load_config(path: str | Path = DEFAULT_CONFIG_PATH, params_path: str | Path = "params.yaml") -> TuneConfig:
    """Read and check tune.yaml against params.yaml; raise :class:`TuneError` on any problem."""
    path = Path(path)
    try:
        load_params(params_path)  # the base must be valid before anything is searched around it
        params = read_yaml_mapping(Path(params_path))
    except ParamsError as e:
        raise TuneError(f"{params_path}: {e}") from None
    try:
        raw = read_yaml_mapping(path, hint="run from the project root, or pass --config", holds="settings")
    except ParamsError as e:
        raise TuneError(str(e)) from None
    raw = dict(raw)
    space_raw, short_raw = raw.pop("space", None), raw.pop("short_run", None) or {}
    try:
        settings = build(TuneSettings, raw, "tune")
        if not isinstance(space_raw, dict) or not space_raw:
            raise ParamsError("tune.space: name at least one params.yaml key to search, with its range")
        if not isinstance(short_raw, dict):
            raise ParamsError("tune.short_run: expected a mapping of params.yaml keys to values")
        space = tuple(parse_dimension(str(key), spec, params) for key, spec in space_raw.items())
        short_run = {str(k): check_value(str(k), v, params, f"tune.short_run.{k}") for k, v in short_raw.items()}
    except ParamsError as e:
        raise TuneError(f"{path}: {e}") from None
    both = sorted(set(short_run) & {d.key for d in space})
    if both:
        raise TuneError(f"{path}: {both[0]} is both searched (space) and fixed (short_run); keep one")
    return TuneConfig(settings, space, short_run, params)


# --------------------------------------------------------------------------- checks


_RANGE_KEYS = {"low", "high", "log", "step"}


def parse_dimension(key: str, spec: Any, params: dict[str, Any]) -> Dimension:
    """The dimension ``spec`` describes for ``key``, checked against the params dataclasses."""
    where = f"tune.space.{key}"
    tp = field_type(key, "tune.space")
    if not isinstance(spec, dict):
        raise ParamsError(f"{where}: expected {{low: .., high: ..}} or {{choices: [...]}}, got {spec!r}")
    unknown = sorted(set(spec) - _RANGE_KEYS - {"choices"})
    if unknown:
        raise ParamsError(f"{where}: unknown setting {unknown[0]!r} (use low, high, log, step or choices)")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ParamsError(f"{where}: give either choices or a low/high range, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ParamsError(f"{where}: choices must be a non-empty list")
        return Dimension(key, "choice", choices=tuple(check_value(key, c, params, where) for c in choices))
    if tp not in (int, float):
        raise ParamsError(f"{where}: {key} is not a number: search it with choices: [...]")
    if "low" not in spec or "high" not in spec:
        raise ParamsError(f"{where}: a range needs both low and high")
    low, high = (check_value(key, spec[b], params, f"{where}.{b}") for b in ("low", "high"))
    if not low < high:
        raise ParamsError(f"{where}: empty range (low {low} must be below high {high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ParamsError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise ParamsError(f"{where}: a log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or not 0 < step <= high - low:
            raise ParamsError(f"{where}.step: expected a number in (0, high - low], got {step!r}")
        if log:
            raise ParamsError(f"{where}: step and log cannot be combined")
        if tp is int and not float(step).is_integer():
            raise ParamsError(f"{where}.step: {key} is an integer, so the step must be one too")
    return Dimension(key, "int" if tp is int else "float", float(low), float(high), log, step)


def check_value(key: str, value: Any, params: dict[str, Any], where: str) -> Value:
    """``value`` as params.yaml's ``key`` would hold it; ParamsError when that params.yaml
    would be invalid (wrong type, out of range, or clashing with another key)."""
    field_type(key, where)
    if isinstance(value, dict | list) or value is None:
        raise ParamsError(f"{where}: {key} takes a single value, got {value!r}")
    try:
        built = build(Params, with_overrides(params, {key: value}), "")
    except ParamsError as e:
        raise ParamsError(f"{where}: {value!r} is not a valid {key} ({e})") from None
    section, name = key.split(".")
    return getattr(getattr(built, section), name)


def field_type(key: str, where: str) -> type:
    """The scalar type (int, float, bool, str) of params.yaml's ``key``; ParamsError when
    ``key`` is not a scalar field of a params section."""
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    hints = typing.get_type_hints(Params)
    section, _, name = key.partition(".")
    if section not in sections or not name:
        raise ParamsError(f"{where}: unknown parameter '{key}' (use section.key with a section of params.yaml: "
                          f"{', '.join(sections)})")
    cls = hints[section]
    fields = typing.get_type_hints(cls, include_extras=True)
    known = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    if name not in known:
        raise ParamsError(f"{where}: unknown parameter '{key}' (known in {section}: {', '.join(known)})")
    tp = fields[name]
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        return str
    if tp not in (int, float, bool, str):
        raise ParamsError(f"{where}: parameter '{key}' is not a single number, flag or name: it cannot be searched")
    return tp


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the params mapping with ``{"section.key": value}`` overrides applied."""
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out
