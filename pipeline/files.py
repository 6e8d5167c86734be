"""Files the stages hand to each other: atomic outputs and the one JSON reader.

Outputs are written to a temporary sibling, then renamed over the target: a crash
or Ctrl-C mid-write leaves the previous file (or nothing), never half a file. A
temporary left behind by a killed process is removed by the next write of the
same output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from chargen.errors import ChargenError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dir(path: str | Path, fix: str = "set a writable place in params.yaml") -> Path:
    """Create the folder ``path`` and its parents if missing; a ChargenError names it
    when it cannot be (a file in the way, no permission, a read-only place). A stage
    calls it for an output folder before its work, so that a long run cannot fail at
    its last step. ``fix`` ends the message: what to do instead."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "a file is in the way" if isinstance(e, FileExistsError | NotADirectoryError) else e.strerror
        raise ChargenError(f"cannot create the folder {path} ({reason}); {fix}") from None
    return path


@contextlib.contextmanager
def _writable(path: Path) -> Iterator[None]:
    """A temporary that cannot be created next to ``path`` is a ChargenError naming it."""
    try:
        yield
    except OSError as e:
        raise ChargenError(f"cannot write {path} ({e.strerror}); set a writable place in params.yaml") from None


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file next to ``path``; on success fsync and rename it into place."""
    path = Path(path)
    make_dir(path.parent)
    remove_stale_temporaries(path)
    with _writable(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp files are private (0600); outputs get the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name; on success swap it in for ``path``."""
    path = Path(path)
    make_dir(path.parent)
    remove_stale_temporaries(path)
    with _writable(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    # mkdtemp makes the folder private (0700); give it the usual permissions instead.
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_prefix(path: Path) -> str:
    # The writer's process id is part of the name, so a later run can tell a temporary
    # of a killed writer from one that is still being written.
    return f".{path.name}.{os.getpid()}."


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of ``path`` whose writer process no longer runs."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or the platform cannot tell: leave it alone
    return True


def read_json_object(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a ChargenError names the problem and ends with ``fix``
    when the file is missing, unreadable or holds something other than an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChargenError(f"{path}: not found; {fix}") from None
    except (OSError, ValueError) as e:
        raise ChargenError(f"{path}: unreadable {what} ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise ChargenError(f"{path}: expected a JSON object of {what}; {fix}")
    return obj
