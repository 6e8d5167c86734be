"""Following a dvclive curve file (``<live_dir>/plots/metrics/val/loss.tsv``) as training
appends to it, one complete row at a time."""

from __future__ import annotations

from pathlib import Path


class CurveFollower:
    """New ``(step, value)`` rows of a dvclive TSV file since the last :meth:`read`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0  # bytes of complete lines already read
        self._columns: tuple[int, int] | None = None  # where step and the value are

    def read(self) -> list[tuple[int, float]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:  # training has not logged yet
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self._offset += len(complete)
        rows = []
        for line in complete.decode("utf-8").splitlines():
            cells = line.split("\t")
            if self._columns is None:  # the header: "step" and the metric's name (the file's stem)
                self._columns = (cells.index("step"), cells.index(self.path.stem))
                continue
            rows.append((int(cells[self._columns[0]]), float(cells[self._columns[1]])))
        return rows
