"""Generated regions in Markdown files: a diagram's Mermaid block and caption between

    <!-- diagram:NAME ... -->
    <!-- /diagram:NAME -->

markers; the text around them is written by hand and left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chargen.errors import ChargenError

REGION = re.compile(r"(<!-- diagram:(\w+)[^>]*-->\n)(.*?)(<!-- /diagram:\2 -->)", re.DOTALL)


@dataclass(frozen=True)
class Diagram:
    name: str  # the NAME of its markers
    mermaid: str  # Mermaid source, newline-terminated
    caption: str


def region(d: Diagram) -> str:
    return f"```mermaid\n{d.mermaid}```\n\n{d.caption}\n"


def fill(text: str, diagrams: dict[str, Diagram], where: str) -> str:
    """``text`` with every region replaced by its diagram; an unknown NAME is an error."""

    def replace(m: re.Match) -> str:
        name = m.group(2)
        if name not in diagrams:
            raise ChargenError(f"{where}: no diagram named {name!r} (known: {', '.join(diagrams)})")
        return m.group(1) + region(diagrams[name]) + m.group(4)

    return REGION.sub(replace, text)


def names(text: str) -> list[str]:
    """The NAME of every region in ``text``, in order."""
    return [m.group(2) for m in REGION.finditer(text)]
