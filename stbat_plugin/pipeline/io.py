"""Atomic file writes: a temporary file in the same folder, fsync, then ``os.replace``.

An interrupted write (exception, ``kill -9`` between the two steps) never leaves a half-written
file under the final name; the temporary file is removed on an exception. The file gets the
permissions of a normally created file (``0o666`` less the process umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_text", "exclusive_folder", "remove_orphan_temps"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], *, binary: bool = True) -> Path:
    """Write ``path`` atomically with ``write(fh)``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists
        return True
    return True


def remove_orphan_temps(path: str | Path) -> list[Path]:
    """Delete temporary files of ``path`` left by a killed writer (its pid no longer runs).

    Temporary files are named ``.NAME.PID.RANDOM.tmp``; those of a live process (a writer
    at work) are kept. Returns the files removed.
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if len(parts) == 3 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def exclusive_folder(out: Path, what: str) -> Iterator[None]:
    """Hold ``OUT/.lock`` (released by the OS even on ``kill -9``): one run per folder."""
    with open(Path(out) / ".lock", "a") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover (not POSIX: no lock)
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another {what} is running on --out {out}; wait for it to finish "
                             "(rerunning the same command then resumes)") from None
        yield
