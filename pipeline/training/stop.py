"""Ending a training run early, on request, as a finished run.

``kill -USR1 <pid>`` (or the hyperparameter search, when it prunes a trial) asks the
loop to stop: it validates and checkpoints the step it has reached and returns
normally, so the stage succeeds and DVC records the shortened run (its metrics say
which step it reached). Ctrl-C is different: it interrupts, and the run resumes later.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNAL = getattr(signal, "SIGUSR1", None)  # None where the platform has no SIGUSR1


class StopRequest:
    """True once a stop signal has arrived. After ``close`` the signal is ignored: a
    request that arrives once the loop has ended is moot (the run has finished), and
    must not kill the process while it writes its outputs."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if STOP_SIGNAL is not None:
            try:
                self._previous = signal.signal(STOP_SIGNAL, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be handled here
                self._previous = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True  # the loop looks at it after each step

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(STOP_SIGNAL, signal.SIG_IGN)
            self._previous = None
