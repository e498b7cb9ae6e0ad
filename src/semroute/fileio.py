"""Small files written whole or not at all: results, metadata and summaries that a crash must not truncate."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import one_line

if TYPE_CHECKING:
    from collections.abc import Iterable


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a hidden sibling of `path`, then rename it over `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def strict_json(data: Any) -> str:
    """JSON text that every reader accepts: NaN and infinities become null (json.dumps would write NaN)."""
    return json.dumps(finite(data), indent=2, allow_nan=False)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity (in nested dicts and lists too) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(strict_json(data)))


def read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file, or one error line naming it, what it is and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} is missing; {fix}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({one_line(err, 120)}); {fix}") from None


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (read in chunks: memory stays flat for multi-GB weights)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Version of the file records of checkpoints (checkpoint.json) and exports (semroute_export.json);
# CHANGELOG.md lists what each version holds.
MANIFEST_FORMAT = 2


def record_files(root: Path, skip: tuple[str, ...] = ()) -> dict:
    """What a directory of outputs holds, for `files_problem` to check later: each file's size and sha256."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in skip)
    return {
        "format": MANIFEST_FORMAT,
        "files": {p.relative_to(root).as_posix(): p.stat().st_size for p in files},
        "sha256": {p.relative_to(root).as_posix(): file_digest(p) for p in files},
    }


def files_problem(root: Path, record: dict, names: Iterable[str] | None = None) -> str | None:
    """Why the files `names` of `root` (default: all recorded) differ from `record`, or None.

    A missing file, another size (truncation) or another sha256 (bit rot, an overwritten byte) is named with
    its path. Records without digests (older releases) are checked by size only.
    """
    sizes, digests = record.get("files"), record.get("sha256", {})
    if not isinstance(sizes, dict) or not isinstance(digests, dict):
        return "its record of files is damaged"
    for name in sizes if names is None else names:
        path = root / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if name in sizes and size != sizes[name]:
            return f"{path} is truncated or damaged ({size} bytes, written as {sizes[name]})"
        if name in digests and file_digest(path) != digests[name]:
            return f"{path} is damaged: its bytes differ from those written (sha256 mismatch)"
    return None


def recorded_problem(
    root: Path, manifest: Path, names: Iterable[str] | None = None
) -> tuple[dict, str | None]:
    """The record `manifest` holds and why `root`'s files (`names`, default all) differ from it, or None when
    they match.

    A manifest that is not a JSON object is itself the problem; a problem of the record's form names the
    manifest.
    """
    try:
        record = json.loads(manifest.read_text())
        if not isinstance(record, dict):
            raise ValueError
    except (OSError, ValueError):
        return {}, f"{manifest} is damaged"
    problem = files_problem(root, record, names)
    if problem and not problem.startswith(str(root)):
        problem = f"{manifest}: {problem}"
    return record, problem


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


class OutputLock:
    """One writer per output: an exclusive lock on `.<name>.lock` beside `path`, released when the holder
    exits.

    A second process is refused in one line naming the holder's pid. flock locks die with their
    process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_file = self.path.parent / f".{self.path.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl  # POSIX only: imported where the lock is taken, so the rest loads anywhere

        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"another semroute process (pid {holder}) is writing to {self.path}; wait for it to finish, "
                f"or choose another output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
