"""Small files written whole or not at all: results, metadata and summaries that a crash must not truncate."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
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


def confined_problem(root: Path, name: object) -> str | None:
    """Why a file name from a record is not a plain path inside `root` (absolute, `..`, a symlink leading
    out, not a string), or None. Records are checked before any file they name is opened."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return f"its record names a file {str(name)[:60]!r} that is not a plain relative path"
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        return f"its record names {name[:120]!r}, outside the directory: the record was altered"
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(root / name)]) != real_root:
        return f"its record names {name[:120]!r}, which leads outside the directory (a symlink)"
    return None


def files_problem(root: Path, record: dict, names: Iterable[str] | None = None) -> str | None:
    """Why the files `names` of `root` (default: all recorded) differ from `record`, or None.

    A missing file, another size (truncation) or another sha256 (bit rot, an overwritten byte) is named with
    its path. Records without digests (older releases) are checked by size only.
    """
    sizes, digests = record.get("files"), record.get("sha256", {})
    if not isinstance(sizes, dict) or not isinstance(digests, dict):
        return "its record of files is damaged"
    for name in sizes if names is None else names:
        outside = confined_problem(root, name)
        if outside:
            return outside
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


def copy_atomic(source: Path, target: Path) -> Path:
    """Copy `source` to `target` (parents made), whole or not at all. Returns `target`."""
    write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def stored_path(path: Path, record_dir: Path) -> str:
    """How a record in `record_dir` stores `path`: relative to the record's own directory, so that moving the
    whole tree (or running from another working directory) keeps it valid."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(record_dir))).as_posix()


def resolve_stored(value: str, record_dir: Path) -> Path:
    """A path a record stores: relative to the record's directory (this release), else as written by an older
    release (absolute, or relative to the working directory it ran in)."""
    path = Path(value)
    if path.is_absolute():
        return path
    here = record_dir / path
    return here if here.exists() or not path.exists() else path


LOCK_NAME = ".semroute.lock"  # the one-writer lock inside an output directory


def entries(directory: Path) -> list[Path]:
    """What a directory holds, but for semroute's own lock file."""
    return [p for p in directory.iterdir() if p.name != LOCK_NAME]


class OutputLock:
    """One writer per output directory: an exclusive lock, released when the holder exits.

    The output is identified by its real path (symlinks and `..` resolved), so two spellings of one directory
    share one lock. The lock file lives inside the output directory (created if need be): a writable output
    in a read-only parent can be locked, and no file is left beside it. A second process is refused in one
    line naming the holder's pid. flock locks die with their process, so a killed run never leaves a stale
    lock behind; the holder removes the file when it is done.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.directory = Path(os.path.realpath(self.path))
        self.lock_file = self.directory / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl  # POSIX only: imported where the lock is taken, so the rest loads anywhere

        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(
                    f"another semroute process (pid {holder}) is writing to {self.path}"
                    + (f" (that is {self.directory})" if str(self.directory) != str(self.path) else "")
                    + "; wait for it to finish, or choose another output"
                ) from None
            # The previous holder may have removed the file between our open and our lock: then the lock
            # is on a file nobody else will find; take it again on the file that is there now.
            try:
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_file)  # while still held: a waiting process re-checks the inode
            os.close(self._fd)  # closing releases the lock
            self._fd = None
