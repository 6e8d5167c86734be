"""The report stage: how the precisions differ, from the compare stage's measurements."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from chargen.errors import ChargenError
from pipeline.files import read_json_object

# The differences and ratios the report shows, in this order.
REPORTED = ("test_loss", "test_nats_per_char", "test_bpc", "spelling_rate", "size_bytes", "chars_per_s",
            "first_char_s", "peak_rss_mb")
PLOTTED = {  # metric -> label in the side-by-side plot
    "chars_per_s": "generation chars/s",
    "first_char_s": "time to first char",
    "size_bytes": "file size",
    "peak_rss_mb": "peak memory",
    "test_nats_per_char": "test loss per char",
    "spelling_rate": "spelling rate",
    "arithmetic_accuracy": "arithmetic accuracy",
}
# Arithmetic accuracies reported when the metrics have them (chargen.arithmetic.accuracy_report).
ARITHMETIC = ("accuracy", "accuracy_longer")


def metrics_path(out_dir: str | Path, precision: str) -> Path:
    """``metrics/<precision>.json``: what the compare stage measured of one precision."""
    return Path(out_dir) / f"{precision}.json"


def read_metrics(path: str | Path) -> dict[str, Any]:
    m = read_json_object(path, "metrics", "run the compare stage for both precisions (dvc repro)")
    missing = [k for k in REPORTED if not isinstance(m.get(k), int | float)]
    if missing:
        raise ChargenError(f"{path}: lacks {missing[0]}; re-run the compare stage")
    return m


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and math.isfinite(a / b) else None


def _accuracies(m: dict[str, Any]) -> dict[str, float]:
    """The arithmetic accuracies of a metrics file, as flat keys (none without held-out problems)."""
    arithmetic = m.get("arithmetic") or {}
    return {f"arithmetic_{k}": arithmetic[k] for k in ARITHMETIC if isinstance(arithmetic.get(k), int | float)}


def report(measured: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report from each precision's metrics (``measured[precision]``, fp32 first):
    ``<p>_minus_fp32`` and ``<p>_over_fp32`` for every other precision, and the plot's rows.
    Arithmetic accuracies are compared too when every precision has them."""
    measured = {name: {**m, **_accuracies(m)} for name, m in measured.items()}
    base_name, base = next(iter(measured.items()))
    keys = list(REPORTED) + [k for k in _accuracies(base) if all(k in m for m in measured.values())]
    summary = {}
    for name, m in list(measured.items())[1:]:
        summary[f"{name}_minus_{base_name}"] = {k: m[k] - base[k] for k in keys}
        summary[f"{name}_over_{base_name}"] = {k: _ratio(m[k], base[k]) for k in keys}
    # One bar per metric and precision, relative to fp32 (= 1), so different units share an axis.
    rows = [
        {
            "metric": f"{label} ({name})",
            "quantity": label,
            "precision": name,
            "value": m[key],
            "relative_to_fp32": _ratio(m[key], base[key]),
        }
        for key, label in PLOTTED.items() if key in keys
        for name, m in measured.items()
    ]
    return summary, rows
