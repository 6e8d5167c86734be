"""A one-line progress bar on stderr for long jobs (``chargen eval`` of a big file).

Redrawn in place at most every ``interval`` seconds and only after ``delay`` seconds,
so a short job prints nothing; ``close`` ends the line. Without a total (a pipe) it
counts the work done instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, unit: str, stream: TextIO | None = None,
                 delay: float = 0.5, interval: float = 0.2) -> None:
        self.total, self.unit = None if total is None else max(total, 1), unit
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.delay, self.interval = delay, interval
        self.next_draw = self.start + delay
        self.shown = False
        self.done = self.count = 0

    def update(self, done: int, rate_count: int) -> None:
        """``done`` of ``total`` units processed; ``rate_count`` items (e.g. characters) so far."""
        self.done, self.count = done, rate_count
        now = time.perf_counter()
        if now >= self.next_draw:
            self.next_draw = now + self.interval
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = f"{self.count / max(now - self.start, 1e-9) / 1e3:.1f}k chars/s"
        if self.total is None:
            self.stream.write(f"\r{self.count / 1e6:.2f} M chars {rate}")
        else:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r[{bar:<30}] {frac:6.1%} {self.done / 1e6:.1f}/{self.total / 1e6:.1f} M{self.unit} "
                              f"{rate}")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """A bar that was drawn shows the last update, and the line ends."""
        if self.shown:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
