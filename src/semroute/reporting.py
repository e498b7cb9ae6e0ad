"""What a training run reports: loss and throughput windows to log.jsonl and accelerate's trackers."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import is_tensorboard_available, is_wandb_available

from .fileio import finite

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class MetricsWindow:
    """Loss and throughput since the last log line; `flush` writes them to log.jsonl and the trackers."""

    start: float = field(default_factory=time.perf_counter)
    loss: float = 0.0
    images: int = 0
    steps: int = 0
    last_loss: float = math.nan
    images_per_s: float = 0.0

    def add(self, loss: float, images: int) -> None:
        self.loss, self.images, self.steps = self.loss + loss, self.images + images, self.steps + 1

    def flush(self, accelerator: Accelerator, log_path: Path, step: int, extra: dict, started: float) -> dict:
        """One record: the window's mean loss and img/s, `extra`
        (lr, entropy, ...) and the time since `started`."""
        now = time.perf_counter()
        self.last_loss = self.loss / self.steps if self.steps else math.nan
        self.images_per_s = self.images / (now - self.start)
        record = {
            "step": step,
            "loss": self.last_loss,
            "images_per_s": self.images_per_s,
            **extra,
            "elapsed_s": now - started,
        }
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(finite(record), allow_nan=False) + "\n")
        # Trackers: main process only
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self.start, self.loss, self.images, self.steps = now, 0.0, 0, 0
        return record


def check_tracker(name: str) -> None:
    """train.report_to names a tracker whose package is installed (or none)."""
    available = {"none": True, "tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if not available[name]:
        package = "tensorboardX (pip install 'semroute[tensorboard]')" if name == "tensorboard" else "wandb"
        raise ValueError(
            f"train.report_to is {name}, but {package} is not installed; install it or set train.report_to: "
            "none"
        )


def flat_config(sections: dict) -> dict:
    """A run config as `section.key: value` scalars, as trackers store hyperparameters."""
    return {
        f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
        for section, values in sections.items()
        for key, value in values.items()
    }
