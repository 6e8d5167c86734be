"""The charts folder: ``<name>.svg`` and ``<name>.png`` per chart and a README.md that shows them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.charts.render import to_png, to_svg
from pipeline.charts.specs import Chart
from pipeline.files import atomic_dir

PAGE = "README.md"


def page(charts: Sequence[Chart]) -> str:
    """Markdown that shows every chart (SVG) and links its PNG."""
    parts = [
        "# Charts\n\n"
        "Written by the report stage (`dvc repro`) from the training curves and the comparison\n"
        "of the precisions; every chart is an SVG with a PNG next to it. Nothing here is edited\n"
        "by hand.\n"
    ]
    for c in charts:
        parts.append(f"\n## {c.title}\n\n![{c.title}]({c.name}.svg)\n\n[PNG]({c.name}.png)\n")
    return "".join(parts)


def write_charts(out_dir: str | Path, charts: Sequence[Chart], png_scale: float) -> None:
    """Render every chart and the page into ``out_dir``, replacing it whole (or not at all)."""
    with atomic_dir(out_dir) as tmp:
        for c in charts:
            (tmp / f"{c.name}.svg").write_text(to_svg(c.spec), encoding="utf-8", newline="")
            (tmp / f"{c.name}.png").write_bytes(to_png(c.spec, png_scale))
        (tmp / PAGE).write_text(page(charts), encoding="utf-8", newline="")
