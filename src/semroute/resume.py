"""Exact resume: a checkpoint's training state (weights, EMA, optimizer, schedule, every RNG), what a
resumed run's config must share with the saved one, and the newest checkpoint a run can resume from."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from .base import one_line
from .checkpoint import (
    RUN_CONFIG_FILE,
    TRAINING_STATE_DIR,
    checkpoint_problem,
    list_checkpoints,
    load_torch_file,
)
from .config import RunConfig, load_config
from .sharding import load_ema, load_optimizer_state, load_weights

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers.training_utils import EMAModel

logger = logging.getLogger(__name__)


def rng_state(generator: torch.Generator) -> dict:
    # On a GPU the global CUDA generators are saved too, so that every RNG a step may touch resumes where it
    # was.
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# Config parts a resumed run must share with the checkpoint; everything else (budget, logging,
# checkpoint cadence, sampling) may change between sessions.
RESUME_MUST_MATCH_TRAIN = (
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "mixed_precision",
    "lr",
    "fusion_lr",
    "betas",
    "weight_decay",
    "warmup_steps",
    "grad_clip",
    "ema_decay",
    "caption_dropout",
    "noise_level_weight",
    "length_grouping",
    "freeze_fusion_after",
)


def resume_differences(saved: RunConfig, current: RunConfig) -> list[str]:
    """What differs, between a checkpoint's run config and this run's, that a resume must not change."""
    diffs = []

    def compare(where: str, a: dict, b: dict) -> None:
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{where}.{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")

    compare("model", saved.model.settings(), current.model.settings())
    compare("text_encoder", saved.text_encoder.to_dict(), current.text_encoder.to_dict())
    if saved.dataset.active or current.dataset.active:
        compare("dataset", asdict(saved.dataset), asdict(current.dataset))
    else:
        compare("data", asdict(saved.data), asdict(current.data))
    compare(
        "train",
        {k: getattr(saved.train, k) for k in RESUME_MUST_MATCH_TRAIN},
        {k: getattr(current.train, k) for k in RESUME_MUST_MATCH_TRAIN},
    )
    return diffs


def load_training_state(
    checkpoint: Path,
    model: torch.nn.Module,
    ema: EMAModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> dict:
    """Restore weights, EMA, optimizer, schedule and RNGs from a checkpoint; returns its state.json.

    The checkpoint holds the full state whatever wrote it; a sharded model (`train.fsdp`) keeps its shard."""
    state_dir = checkpoint / TRAINING_STATE_DIR

    def load(name: str, read: Callable[[Path], Any]) -> Any:
        try:
            return read(state_dir / name)
        except Exception as err:  # one line naming the file, whatever the library raised
            raise ValueError(
                f"{state_dir / name} cannot be read ({one_line(err, 200)}); resume from an "
                f"older checkpoint by moving this one aside"
            ) from None

    load_weights(model, load("model.safetensors", load_file))
    shadow = load("ema.safetensors", load_file)
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(
            f"{checkpoint} holds {len(shadow)} EMA tensors, the model has {len(ema.shadow_params)}"
        )
    load_ema(ema, [shadow[str(i)] for i in range(len(shadow))])
    load_optimizer_state(model, optimizer, load("optimizer.pt", load_torch_file))
    scheduler.load_state_dict(load("scheduler.pt", load_torch_file))
    set_rng_state(load("rng.pt", load_torch_file), generator)
    state = load("state.json", lambda path: json.loads(path.read_text()))
    ema.optimization_step = state["ema_optimization_step"]
    return state


def newest_loadable(run_dir: Path, config: RunConfig) -> tuple[Path, RunConfig] | None:
    """The newest checkpoint a run can resume from, with its run config; None when the run has none.

    A damaged checkpoint (a missing, truncated or unreadable file) falls back to the one before it. A
    run whose checkpoints all are damaged, or one whose config this version cannot read, is an error:
    training over it would delete what cannot be read.
    """
    checkpoints = list_checkpoints(run_dir)
    problems = []
    for checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            logger.warning("cannot resume from %s: %s; trying an older checkpoint", checkpoint.name, problem)
            problems.append(problem)
            continue
        try:
            saved = load_config(checkpoint / RUN_CONFIG_FILE)
        except ValueError as err:
            raise ValueError(
                f"{checkpoint} cannot be read by this semroute ({err}); it was written by another version: "
                f"resume it with that version, or train into a new --out"
            ) from None
        return checkpoint, saved
    if checkpoints:
        raise ValueError(
            f"{run_dir} holds {len(checkpoints)} checkpoint(s) and none can be resumed (newest: "
            f"{problems[0]}); nothing was overwritten: restore them, or train into a new --out"
        )
    return None


def saved_precision(checkpoint: Path) -> str | None:
    """The precision a checkpoint was trained in (None for checkpoints that predate the record)."""
    try:
        state = json.loads((checkpoint / TRAINING_STATE_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return (state.get("precision") or {}).get("name") if isinstance(state, dict) else None
