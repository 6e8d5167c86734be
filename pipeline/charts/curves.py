"""The training curves dvclive logs: one TSV per metric, ``<live_dir>/plots/metrics/<name>.tsv``.

A metric named ``train/loss`` is the series ``train`` of the quantity ``loss``; series of the
same quantity (``train/loss``, ``val/loss``) belong on one chart.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from chargen.errors import ChargenError

FIX = "run the train stage (dvc repro)"


@dataclass(frozen=True)
class Curve:
    quantity: str  # "loss"
    series: str  # "train"; "" for a metric logged without a prefix ("lr")
    steps: tuple[int, ...]
    values: tuple[float, ...]


def curves_dir(live_dir: str | Path) -> Path:
    """Where dvclive writes the curves of a run logged to ``live_dir``."""
    return Path(live_dir) / "plots" / "metrics"


def read_curves(metrics_dir: str | Path) -> dict[str, list[Curve]]:
    """Every curve under ``metrics_dir``, grouped by quantity; quantities and series sorted."""
    metrics_dir = Path(metrics_dir)
    files = sorted(metrics_dir.rglob("*.tsv"))
    if not files:
        raise ChargenError(f"{metrics_dir}: no training curves found; {FIX}")
    grouped: dict[str, list[Curve]] = {}
    for path in files:
        name = path.relative_to(metrics_dir).with_suffix("").as_posix()
        series, _, quantity = name.rpartition("/")
        grouped.setdefault(quantity, []).append(read_curve(path, quantity, series))
    return {q: sorted(grouped[q], key=lambda c: c.series) for q in sorted(grouped)}


def read_curve(path: Path, quantity: str, series: str) -> Curve:
    """One dvclive TSV: a header ``step<TAB><quantity>``, then one finite value per step."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ChargenError(f"{path}: unreadable curve ({e}); {FIX}") from None
    steps, values = [], []
    for line, row in enumerate(rows, start=2):
        try:
            step, value = int(row["step"]), float(row[quantity])
        except (KeyError, TypeError, ValueError):
            raise ChargenError(f"{path}:{line}: expected a step and a {quantity} value; {FIX}") from None
        if math.isfinite(value):  # a diverged run stops at its non-finite loss: nothing to draw
            steps.append(step)
            values.append(value)
    return Curve(quantity, series, tuple(steps), tuple(values))
