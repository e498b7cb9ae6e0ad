"""Telling the user how long long work takes: a pace measured after warm-up, durations in words."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger("semroute.train")


class Pace:
    """Times a few steps after warm-up, then calls
    `report(seconds_per_step, seconds_left)` once: an ETA for the user."""

    WARMUP, MEASURED = 2, 10

    def __init__(
        self,
        first_step: int,
        max_steps: int,
        minutes: float | None,
        report: Callable[[float, float], None] | None,
    ) -> None:
        self.first_step, self.max_steps, self.minutes, self.report = first_step, max_steps, minutes, report
        self.measure_from = (
            first_step  # the step the pace is measured from (`restart` moves it, not first_step)
        )
        self.started: float | None = None

    def restart(self, step: int) -> None:
        """Measure again from `step` (the pace changed, e.g. the
        steps began to run compiled); nothing if reported."""
        if self.report is not None:
            self.measure_from, self.started = step, None

    def update(self, step: int) -> None:
        if self.report is None:
            return
        if step == self.measure_from + self.WARMUP:
            self.started = time.perf_counter()
        elif self.started is not None and step == self.measure_from + self.WARMUP + self.MEASURED:
            per_step = (time.perf_counter() - self.started) / self.MEASURED
            left = (self.max_steps - step) * per_step
            self.report(per_step, left if self.minutes is None else min(left, 60 * self.minutes))
            self.report = None


def log_pace(seconds_per_step: float, seconds_left: float) -> None:
    logger.info("%.2f s per step: about %s of training left", seconds_per_step, format_duration(seconds_left))


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '2 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"
