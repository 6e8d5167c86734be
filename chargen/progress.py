"""A one-line progress bar on stderr for long jobs (``chargen eval`` of a big file).

Redrawn in place at most every ``interval`` seconds and only after ``delay`` seconds,
so a short job prints nothing; ``close`` ends the line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, unit: str, stream: TextIO | None = None,
                 delay: float = 0.5, interval: float = 0.2) -> None:
        self.total, self.unit = max(total, 1), unit
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.delay, self.interval = delay, interval
        self.next_draw = self.start + delay
        self.shown = False

    def update(self, done: int, rate_count: int) -> None:
        """``done`` of ``total`` units processed; ``rate_count`` items (e.g. characters) so far."""
        now = time.perf_counter()
        if now < self.next_draw:
            return
        self.next_draw = now + self.interval
        frac = min(done / self.total, 1.0)
        bar = "#" * int(30 * frac)
        rate = rate_count / max(now - self.start, 1e-9)
        self.stream.write(
            f"\r[{bar:<30}] {frac:6.1%} {done / 1e6:.1f}/{self.total / 1e6:.1f} M{self.unit} "
            f"{rate / 1e3:.1f}k chars/s"
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
