"""What the CLI's parser and the library share without importing torch: errors, limits, choices, defaults.

`semroute --help` imports only this module (and the standard library); every other module imports from it,
so each constant and each rule below has exactly one home.
"""

from __future__ import annotations

import errno
import math
import os
import signal
from importlib import resources
from pathlib import Path

# Choices of keys that are also flags (train.mixed_precision / --precision, train.compile / --compile).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")

# Integers past this are typos (a seed, a step count, a size), not values: torch and the OpenMP runtime
# take 32-bit counts.
INT_LIMIT = 2**31 - 1
MAX_SEED = INT_LIMIT
# Upper bounds by sense for size-like settings, checked before anything is allocated (a value past them is a
# typo, not a plan); training also checks the batch's estimated memory against the machine's.
SIZE_LIMITS = {
    "batch_size": 2**16,  # images in one micro-step
    "gradient_accumulation_steps": 2**12,
    "keep_checkpoints": 10_000,
    "length_grouping": 2**16,
    "images_per_prompt": 1024,
    "sampling_steps": 10_000,
    "num_workers": 256,
}


def check_size(value: int, name: str, key: str) -> int:
    """A size-like value within 1..SIZE_LIMITS[key] (0 passes where the caller allows it)."""
    limit = SIZE_LIMITS[key]
    if value > limit:
        raise ValueError(f"{name} {value} is past the sensible limit of {limit:,}; choose a smaller value")
    return value


# Packaged configs (configs/ in the repository links to them).
QUICK_MINUTES = 1.5  # `semroute ablate --quick`: minutes per run
DEMO_CONFIG = "demo.yaml"
ABLATION_CONFIG = "ablation.yaml"

# Exit codes of the `semroute` command besides 0 (done) and 130 (interrupted).
EXIT_ERROR = 2  # bad input or an environment problem, reported in one line
EXIT_DIVERGED = 3  # training stopped on non-finite losses or weights
NOT_LEARNED_EXIT = 4  # `semroute demo` ran but its model did not learn
EXIT_BUG = 70  # an exception semroute did not expect: a bug (BSD's EX_SOFTWARE); --debug shows the traceback
DEBUG_ENV = "SEMROUTE_DEBUG"  # set to 1: full tracebacks instead of one-line errors (as --debug does)


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package."""
    return Path(str(resources.files("semroute") / "configs" / name))


def one_line(err: BaseException | str, limit: int | None = None) -> str:
    """An exception's message on one line (whitespace collapsed), cut to `limit` characters."""
    text = " ".join(str(err).split())
    return text if limit is None else text[:limit]


def check_choice(value: object, choices: tuple[str, ...], name: str) -> str:
    """`value` if it is one of `choices`, else an error naming the key and the valid ones."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def check_guidance(value: float, name: str = "guidance_scale") -> float:
    """The classifier-free guidance rule: a finite scale >= 1 (1 disables guidance)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1):
        raise ValueError(f"{name} must be >= 1 (1 disables guidance), got {value}")
    return float(value)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or weights that are no longer finite."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary, after a checkpoint was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}; run the same "
            "command again to resume from it"
        )


class OutputError(OSError):
    """Writing an output failed (full disk, file-size limit,
    permissions); the message names the path and the fix."""

    def __str__(self) -> str:
        return str(self.args[0])


# Each OS error answered by its own cause: what errno says happened, and what fixes that.
ERRNO_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there, or choose another location",
    errno.EDQUOT: "the disk quota of this user is used up: free space, or choose another location",
    errno.EFBIG: "the file outgrew the size limit of this process or file system (ulimit -f): raise it, or "
    "choose another location",
    errno.EACCES: "permission denied: make it readable/writable by this user, or choose another location",
    errno.EPERM: "the operation is not permitted there: check its owner and permissions, or choose another "
    "location",
    errno.EROFS: "the file system is read-only: choose a location on a writable one",
    errno.EEXIST: "a file of that name is in the way: move it, or choose another name",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
    errno.EISDIR: "it is a directory where a file is expected: name a file",
    errno.ENOTEMPTY: "the directory is not empty: empty it, or choose a new one",
    errno.ELOOP: "symbolic links there point in a loop: fix or remove the link",
    errno.ENAMETOOLONG: "the path is too long for the file system: choose a shorter one",
    errno.ENOENT: "it does not exist: check the path",
    errno.EMFILE: "this process has too many files open: raise the limit (ulimit -n)",
    errno.ENFILE: "the system has too many files open: close some programs, or raise the limit",
    errno.ENOMEM: "the system is out of memory: ask for less, or free memory",
    errno.EIO: "the device reported an input/output error: check the disk (dmesg), or choose another "
    "location",
    errno.EBUSY: "it is in use by another program: wait for it, or choose another location",
    errno.ETXTBSY: "it is in use by another program: wait for it, or choose another location",
    errno.EXDEV: "it would move across file systems: keep the output on the file system of its directory",
    errno.ESTALE: "the network file handle is stale: check the mount, then run again",
}


def os_error_line(err: OSError, action: str = "") -> str:
    """One line for an OS error: the path(s), what errno says happened, and the advice for that cause."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    code = err.errno
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    what = err.strerror or str(err)
    advice = ERRNO_ADVICE.get(code) if isinstance(code, int) else None
    head = f"{action} " if action else ""
    where = f"{paths}: " if paths else ""
    tail = f"; {advice}" if advice else ""
    return f"{head}{where}{what}{f' ({name})' if name else ''}{tail}"


def errno_of(err: BaseException) -> int | None:
    """The errno behind an exception: an OSError's own, one it was raised from, or the '(os error N)' that
    Rust-backed libraries (safetensors, tokenizers) put in their messages."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and isinstance(seen.errno, int):
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    import re

    found = re.search(r"os error (\d+)", str(err))
    return int(found.group(1)) if found else None


def io_advice(err: BaseException, otherwise: str) -> str:
    """The advice that fits the cause of a failed write or read (its errno), else `otherwise`."""
    code = errno_of(err)
    return ERRNO_ADVICE.get(code, otherwise) if code is not None else otherwise


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits_memory(nbytes: float, what: str, fix: str, fraction: float = 1.0) -> None:
    """Refuse, before allocating, a size whose estimated bytes exceed `fraction` of this machine's RAM."""
    total = physical_memory()
    if total is not None and nbytes > fraction * total:
        raise ValueError(
            f"{what} needs about {gib(nbytes)}, more than this machine's {gib(total)} of memory; {fix}"
        )


def cpu_count() -> int:
    """CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


MAX_THREADS_PER_CPU = 4  # more threads than this per CPU only slow torch down (and huge counts abort OpenMP)


def check_threads(value: int, name: str) -> int:
    """A thread count within 1 .. MAX_THREADS_PER_CPU x the CPUs this process may use."""
    limit = MAX_THREADS_PER_CPU * cpu_count()
    if not 1 <= value <= limit:
        raise ValueError(
            f"{name} must be in 1..{limit} ({MAX_THREADS_PER_CPU} per CPU of the {cpu_count()} this process "
            f"may use), got {value}"
        )
    return value


def valid_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; a command-line argument holding bytes that are not UTF-8 (Python keeps
    them as lone surrogates) is an error naming the argument, not a crash deep in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end].encode("utf-8", "surrogateescape")
        raise ValueError(
            f"{what} is not valid UTF-8 text (byte {bad[:1].hex()} at character {err.start}); pass it in "
            "UTF-8"
        ) from None
    return text
