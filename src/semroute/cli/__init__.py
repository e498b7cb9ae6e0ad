"""`semroute` command line: train, sample, routing, eval, trajectory, ablate, precompute, sample-bench, serve,
export, demo. `main` parses first and imports the commands (and with them torch) only to run one."""

from __future__ import annotations

import csv
import json
import os
import sys

from .. import __version__
from ..base import (
    DEBUG_ENV,
    EXIT_BUG,
    EXIT_DIVERGED,
    EXIT_ERROR,
    OutputError,
    TrainingDiverged,
    TrainingStopped,
    one_line,
    os_error_line,
)
from .parser import build_parser

OUT_OF_MEMORY = (
    "ran out of memory; lower train.batch_size (or raise gradient_accumulation_steps), the model size, "
    "--n or --batch-size; checkpoints already written are intact"
)


# What CUDA, MPS and torch's CPU allocator say when an allocation fails.
MEMORY_PHRASES = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"semroute: {message}", file=sys.stderr)
    return code


def debugging(argv_debug: bool) -> bool:
    return argv_debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def describe(err: BaseException) -> tuple[str, int]:
    """The one line (and exit code) for an exception that ended a command: the error boundary.

    Errors semroute raises on purpose carry their own message (the input and the fix); an OS error is
    answered by its errno; a library's parse error says what it could not read; anything else is a bug.
    """
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(err, TrainingStopped):
        return str(err), 128 + err.signum
    if isinstance(err, TrainingDiverged):
        return f"training stopped: {err}", EXIT_DIVERGED
    if isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and any(phrase in str(err).lower() for phrase in MEMORY_PHRASES)
    ):
        detail = one_line(err, 160)
        return f"error: {OUT_OF_MEMORY}" + (f" ({detail})" if detail else ""), EXIT_ERROR
    if isinstance(err, UnicodeError):
        return (
            f"error: text that is not valid UTF-8 ({one_line(err, 160)}); save the file as UTF-8 "
            f"(--debug shows which read failed)",
            EXIT_ERROR,
        )
    if isinstance(err, (json.JSONDecodeError, csv.Error)):
        kind = "JSON" if isinstance(err, json.JSONDecodeError) else "CSV"
        return f"error: a file is not valid {kind} ({one_line(err, 160)}); --debug shows which", EXIT_ERROR
    if isinstance(err, OutputError):
        return f"error: {err}", EXIT_ERROR
    if isinstance(err, OSError):
        if err.errno is None:  # raised by semroute with its own message
            return f"error: {one_line(err)}", EXIT_ERROR
        return f"error: {os_error_line(err)}", EXIT_ERROR
    if isinstance(err, ValueError):
        return f"error: {err}", EXIT_ERROR
    return (
        f"internal error: {type(err).__name__}: {one_line(err, 300)}; this looks like a bug in semroute "
        f"{__version__}: run the command again with --debug (or {DEBUG_ENV}=1) and report the traceback as "
        "an issue",
        EXIT_BUG,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = debugging(getattr(args, "debug", False))
    try:
        from . import commands  # after parsing: --help and argument errors never load torch

        commands.configure_logging()
        code = commands.COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as err:
        if debug and not isinstance(err, KeyboardInterrupt):
            raise
        message, code = describe(err)
        return _fail(message, code)
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
