"""Small files written whole or not at all: results, metadata and summaries that a crash must not truncate."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a hidden sibling of `path`, then rename it over `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def strict_json(data) -> str:
    """JSON text that every reader accepts: NaN and infinities become null (json.dumps would write NaN)."""
    return json.dumps(finite(data), indent=2, allow_nan=False)


def finite(value):
    """`value` with every NaN or infinity (in nested dicts and lists too) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, data) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(strict_json(data)))


def read_json(path: Path, what: str, fix: str):
    """A JSON file, or one error line naming it, what it is and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} is missing; {fix}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({' '.join(str(err).split())[:120]}); {fix}") from None


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


class OutputLock:
    """One writer per output: an exclusive lock on `.<name>.lock` beside `path`, released when the holder exits.

    A second process is refused in one line naming the holder's pid. flock locks die with their
    process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_file = self.path.parent / f".{self.path.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"another semroute process (pid {holder}) is writing to {self.path}; wait for it to finish, "
                             f"or choose another output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
