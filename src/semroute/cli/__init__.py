"""`semroute` command line: train, sample, routing, eval, trajectory, ablate, precompute, sample-bench, serve,
export, demo. `main` parses first and imports the commands (and with them torch) only to run one."""

from __future__ import annotations

import sys

from ..base import EXIT_DIVERGED, EXIT_ERROR, OutputError, TrainingDiverged, TrainingStopped, one_line
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands  # after parsing: --help and argument errors never load torch

    commands.configure_logging()
    try:
        code = commands.COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError, OutputError) as err:
        return _fail(f"error: {err}")
    except OSError as err:  # permissions, a full or read-only disk: nothing already written is touched
        where = f" ({err.filename})" if err.filename else ""
        return _fail(
            f"error: {err.strerror or err}{where}; check the free space and permissions of the output "
            "directory, or choose another one"
        )
    except MemoryError:
        return _fail(f"error: {OUT_OF_MEMORY}")
    except TrainingDiverged as err:
        return _fail(f"training stopped: {err}", EXIT_DIVERGED)
    except RuntimeError as err:
        if any(phrase in str(err).lower() for phrase in MEMORY_PHRASES):
            return _fail(f"error: {OUT_OF_MEMORY} ({one_line(err, 160)})")
        raise
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except TrainingStopped as err:
        return _fail(str(err), 128 + err.signum)
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
