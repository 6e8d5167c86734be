"""Vega-Lite specs of the report's charts, data inline, made to be read as still pictures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.charts.curves import Curve

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
WIDTH = 480
# Axis titles of the quantities the train stage logs; any other quantity is titled by its name.
TITLES = {
    "loss": "loss (nats per character)",
    "lr": "learning rate",
    "tokens_per_s": "training tokens/s",
    "train_seconds": "training time (s)",
}


@dataclass(frozen=True)
class Chart:
    name: str  # file stem: <name>.svg, <name>.png
    title: str
    spec: dict[str, Any]


def title_of(quantity: str) -> str:
    return TITLES.get(quantity, quantity.replace("_", " "))


def and_list(words: Sequence[str]) -> str:
    return " and ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} and {words[-1]}"


def curve_chart(quantity: str, curves: Sequence[Curve]) -> Chart:
    """One line per curve of ``quantity`` against the step; several series share the chart."""
    rows = [
        {"step": step, "value": value, "series": c.series or quantity}
        for c in curves
        for step, value in zip(c.steps, c.values, strict=True)
    ]
    series = [c.series or quantity for c in curves]
    title = title_of(quantity) if len(series) == 1 else f"{and_list(series)} {quantity}"
    color: dict[str, Any] = {"field": "series", "type": "nominal", "sort": series, "title": None}
    if len(curves) == 1:
        color["legend"] = None
    spec = {
        "$schema": SCHEMA,
        "title": title,
        "width": WIDTH,
        "height": 240,
        "data": {"values": rows},
        "mark": {"type": "line", "strokeWidth": 1.5},
        "encoding": {
            "x": {"field": "step", "type": "quantitative", "title": "step"},
            "y": {"field": "value", "type": "quantitative", "title": title_of(quantity),
                  "scale": {"zero": False}},
            "color": color,
        },
    }
    return Chart(quantity, title, spec)


def curve_charts(curves: dict[str, list[Curve]]) -> list[Chart]:
    return [curve_chart(quantity, group) for quantity, group in curves.items()]


def comparison_chart(rows: Sequence[dict[str, Any]], precisions: Sequence[str]) -> Chart:
    """Bars of each measurement per precision relative to the first precision (a rule at 1).

    ``rows``: the report's plot rows (``quantity``, ``precision``, ``relative_to_fp32``).
    """
    base = precisions[0]
    title = f"{', '.join(precisions[1:])} relative to {base} (= 1)"
    values = [r for r in rows if r["relative_to_fp32"] is not None]
    # y and yOffset on the bars and their labels only: the rule at 1 spans the whole chart.
    rows_y = {
        "y": {"field": "quantity", "type": "nominal", "title": None, "sort": None},
        "yOffset": {"field": "precision", "type": "nominal", "sort": list(precisions)},
    }
    bars = {
        "mark": {"type": "bar"},
        "encoding": {
            **rows_y,
            "x": {"field": "relative_to_fp32", "type": "quantitative", "title": f"relative to {base}"},
            "color": {"field": "precision", "type": "nominal", "sort": list(precisions), "title": None},
        },
    }
    labels = {  # the ratios of the other precisions (the base's are all 1)
        "transform": [{"filter": {"field": "precision", "oneOf": list(precisions[1:])}}],
        "mark": {"type": "text", "align": "left", "dx": 3, "fontSize": 10},
        "encoding": {
            **rows_y,
            "x": {"field": "relative_to_fp32", "type": "quantitative"},
            "text": {"field": "relative_to_fp32", "type": "quantitative", "format": ".3f"},
        },
    }
    one = {"mark": {"type": "rule", "strokeDash": [4, 3], "color": "#666"}, "encoding": {"x": {"datum": 1}}}
    spec = {
        "$schema": SCHEMA,
        "title": title,
        "width": WIDTH,
        "height": {"step": 12},
        "data": {"values": values},
        "layer": [bars, labels, one],
    }
    return Chart("compare", title, spec)
