"""What a search found: files for ``dvc metrics show`` / ``dvc plots show`` and a table.

``<out_dir>/summary.json``: the counts, the best short-budget trial, the full-budget
confirmations, the winner (the best confirmation, else the best trial) and the
parameter importances (Optuna's PED-ANOVA evaluator over the complete trials).
``<out_dir>/importance.json``: one row per parameter, a bar each in ``dvc plots show``.
``<out_dir>/params/<key>.json``: one row per complete trial (``value`` of that
parameter, ``objective``), so ``dvc plots show`` draws the metric against each parameter.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.files import atomic_dir, write_json
from pipeline.tuning.config import TuneConfig
from pipeline.tuning.search import format_params, top_trials

TOP_ROWS = 8  # trials in the printed table and summary.json


def importances(study: Any) -> dict[str, float]:
    """Share of the metric's variation each parameter explains (empty with too few trials)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # e.g. every complete trial has the same parameters
        return {}
    return {k: round(float(v), 4) for k, v in found.items() if math.isfinite(v)}


def trial_row(trial: Any) -> dict[str, Any]:
    return {"trial": trial.number, "experiment": trial.user_attrs.get("experiment"),
            "value": trial.value, "params": trial.params}


def summarize(cfg: TuneConfig, search: Any, full: Any | None) -> dict[str, Any]:
    """summary.json's content for the two studies."""
    counts = {state.name.lower(): len(search.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    top = [trial_row(t) for t in top_trials(search, TOP_ROWS)]
    confirmed = []
    if full is not None:
        for t in full.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            short = search.trials[t.user_attrs["confirms"]]
            confirmed.append({**trial_row(t), "short_value": short.value, "confirms": short.number})
        sign = 1 if cfg.settings.direction == "minimize" else -1
        confirmed.sort(key=lambda row: sign * row["value"])
    winner = confirmed[0] if confirmed else (top[0] if top else None)
    baseline = [trial_row(t) for t in search.trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE]
    return {
        "study": cfg.settings.study, "metric": cfg.settings.metric, "direction": cfg.settings.direction,
        "short_run": cfg.short_run, "trials": counts, "baseline": baseline[0] if baseline else None,
        "top": top, "confirmed": confirmed, "winner": winner, "winner_at_full_budget": bool(confirmed),
        "importance": importances(search),
    }


def write_summary(cfg: TuneConfig, summary: dict[str, Any], search: Any) -> Path:
    """summary.json, importance.json and params/<key>.json under the out_dir."""
    out = Path(cfg.settings.out_dir)
    write_json(out / "summary.json", summary)
    write_json(out / "importance.json", [{"param": k, "importance": v} for k, v in summary["importance"].items()])
    complete = search.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with atomic_dir(out / "params") as tmp:  # the files of parameters no longer searched go too
        for d in cfg.space:
            rows = [{"value": t.params[d.key], "objective": t.value, "trial": t.number}
                    for t in complete if d.key in t.params]
            write_json(tmp / f"{d.key}.json", rows)
    return out / "summary.json"


def print_summary(cfg: TuneConfig, summary: dict[str, Any]) -> None:
    """The table of the best trials, the importances and how to apply the winner."""
    metric = cfg.metric_key
    counts = summary["trials"]
    print(f"\n{summary['study']}: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed "
          f"search trials ({format_params(cfg.short_run)})")
    keys = [d.key for d in cfg.space]
    header = ["trial", metric, *keys, "experiment"]
    rows = [[str(r["trial"]), f"{r['value']:.4f}", *(_cell(r["params"].get(k)) for k in keys), r["experiment"] or ""]
            for r in summary["top"]]
    for line in _table(header, rows):
        print(line)
    if summary["importance"]:
        print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importance"].items()))
    for r in summary["confirmed"]:
        print(f"full budget: {r['experiment']} {metric} {r['value']:.4f} (short run: {r['short_value']:.4f})")
    winner = summary["winner"]
    if winner:
        at = "at full budget" if summary["winner_at_full_budget"] else "at the short budget"
        print(f"best {at}: {winner['experiment']} ({metric} {winner['value']:.4f}): {format_params(winner['params'])}")
        print(f"apply it with: dvc exp apply {winner['experiment']}")


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
