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
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        detail = " ".join(str(e).split())[:200] or "an allocation failed"
        print(f"error: not enough memory ({detail}); make the run smaller in params.yaml "
              "(a batch size, the model's size, the n-gram tables)", file=sys.stderr)
        raise SystemExit(1) from None


def _out_of_memory(e: BaseException) -> bool:
    """numpy's MemoryError; torch reports a failed allocation as a RuntimeError
    ("DefaultCPUAllocator: can't allocate memory"), or its subclass OutOfMemoryError on CUDA."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(e))
