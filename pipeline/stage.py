"""Running a stage script: user errors become one line on stderr and exit code 1."""

from __future__ import annotations

import sys
from collections.abc import Callable

from chargen.errors import ChargenError
from pipeline.params import ParamsError


def run_stage(main: Callable[[], None]) -> None:
    """Call ``main``; print a ChargenError/ParamsError as one line and exit 1; Ctrl-C exits 130."""
    try:
        main()
    except (ChargenError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
