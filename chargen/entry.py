"""The ``chargen`` console script, kept free of heavy imports.

Loading the command line (typer, numpy) takes tens of milliseconds, and Ctrl-C in that
time must end the way Ctrl-C ends a running command: the line "interrupted" on stderr
and exit code 130, no traceback.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a run ended by Ctrl-C

_interrupted = False


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    """Python's own Ctrl-C handler, remembering that it ran."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def interrupted() -> None:
    """Report Ctrl-C and exit with its code."""
    if sys.stderr is not None:  # None when the shell closed it (2>&-)
        sys.stderr.write("interrupted\n")
    raise SystemExit(EXIT_INTERRUPTED)


def main() -> None:
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        from chargen.cli import main as run

        run()
    except KeyboardInterrupt:
        interrupted()
    except ImportError:
        # ONNX Runtime's extension module turns an interrupt during its import into an
        # ImportError ("initialization failed").
        if not _interrupted:
            raise
        interrupted()
