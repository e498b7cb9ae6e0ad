"""What the CLI's parser and the library share without importing torch: errors, limits, choices, defaults.

`semroute --help` imports only this module (and the standard library); every other module imports from it,
so each constant and each rule below has exactly one home.
"""

from __future__ import annotations

import math
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

# Packaged configs (configs/ in the repository links to them).
QUICK_MINUTES = 1.5  # `semroute ablate --quick`: minutes per run
DEMO_CONFIG = "demo.yaml"
ABLATION_CONFIG = "ablation.yaml"

# Exit codes of the `semroute` command besides 0 (done) and 130 (interrupted).
EXIT_ERROR = 2  # bad input or an environment problem, reported in one line
EXIT_DIVERGED = 3  # training stopped on non-finite losses or weights
NOT_LEARNED_EXIT = 4  # `semroute demo` ran but its model did not learn


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
