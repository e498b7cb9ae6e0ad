"""Crash-safe checkpoints and exact resume.

A checkpoint is written into a hidden temporary directory, every file and the directory are
fsync'ed, and only then is it renamed to `checkpoints/step_NNNNNN`: a process killed at any moment
leaves either the previous checkpoints alone or a complete new one (plus a hidden leftover that the
next run removes). The newest K are kept. A checkpoint whose weights are not all finite is refused.

Layout: config.json + diffusion_pytorch_model.safetensors (EMA weights, diffusers format),
text_encoder.json, run_config.yaml, [vae.json], training_state/{model.safetensors, ema.safetensors,
optimizer.pt, scheduler.pt, rng.pt, state.json}.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"
TRAINING_STATE_DIR = "training_state"
TEXT_ENCODER_FILE = "text_encoder.json"
VAE_FILE = "vae.json"
STEP_PREFIX = "step_"


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or weights that are no longer finite."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(root)


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def save_checkpoint(
    directory: Path,
    model,
    ema,
    optimizer,
    state: dict,
    config,
    encoder,
    vae_path: str | None = None,
    scheduler=None,
    rng: dict | None = None,
) -> Path:
    """Write a checkpoint atomically; `state` holds at least {"step": N} and is stored as training_state/state.json."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not all_finite(weights.values()) or not all_finite(ema.shadow_params):
        raise TrainingDiverged(f"the weights at step {state['step']} are not all finite; no checkpoint was written")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        model.save_pretrained(tmp)
        ema.restore(model.parameters())
        state_dir = tmp / TRAINING_STATE_DIR
        state_dir.mkdir()
        save_file(weights, state_dir / "model.safetensors")
        save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, state_dir / "ema.safetensors")
        torch.save(optimizer.state_dict(), state_dir / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
        if rng is not None:
            torch.save(rng, state_dir / "rng.pt")
        (state_dir / "state.json").write_text(json.dumps({**state, "ema_optimization_step": ema.optimization_step}))
        # The layers as configured (empty = all) and as resolved for this model.
        (tmp / TEXT_ENCODER_FILE).write_text(json.dumps({**encoder.config.to_dict(), "resolved_layers": encoder.layers}, indent=2))
        config.save(tmp / RUN_CONFIG_FILE)
        if vae_path is not None:
            (tmp / VAE_FILE).write_text(json.dumps({"path": str(vae_path)}))
        _fsync_tree(tmp)
        if directory.exists():  # only when a step is saved twice; the older copy goes
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        _fsync(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a checkpoint directory exists only once complete)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / TEXT_ENCODER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` (>= 1) checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(run_dir: Path) -> None:
    """Hidden temporary directories of checkpoint writes that were killed: never complete, safe to delete."""
    root = run_dir / "checkpoints"
    for tmp in root.glob(f".{STEP_PREFIX}*") if root.is_dir() else []:
        logger.info("removing %s, left by an interrupted checkpoint write", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def load_raw_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The non-EMA training weights of a checkpoint."""
    return load_file(checkpoint / TRAINING_STATE_DIR / "model.safetensors")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / TEXT_ENCODER_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with checkpoints/step_*")
    return found[-1]


def rng_state(generator: torch.Generator) -> dict:
    # On a GPU the global CUDA generators are saved too, so that every RNG a step may touch resumes where it was.
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": np.random.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# Config parts a resumed run must share with the checkpoint; everything else (budget, logging,
# checkpoint cadence, sampling) may change between sessions.
RESUME_MUST_MATCH_TRAIN = ("batch_size", "gradient_accumulation_steps", "seed", "mixed_precision", "lr", "fusion_lr",
                           "betas", "weight_decay", "warmup_steps", "grad_clip", "ema_decay", "caption_dropout")


def resume_differences(saved, current) -> list[str]:
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
    compare("train", {k: getattr(saved.train, k) for k in RESUME_MUST_MATCH_TRAIN},
            {k: getattr(current.train, k) for k in RESUME_MUST_MATCH_TRAIN})
    return diffs


def load_training_state(checkpoint: Path, model, ema, optimizer, scheduler, generator) -> dict:
    """Restore weights, EMA, optimizer, schedule and RNGs from a checkpoint; returns its state.json."""
    state_dir = checkpoint / TRAINING_STATE_DIR
    model.load_state_dict(load_file(state_dir / "model.safetensors"))
    shadow = load_file(state_dir / "ema.safetensors")
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(f"{checkpoint} holds {len(shadow)} EMA tensors, the model has {len(ema.shadow_params)}")
    for i, p in enumerate(ema.shadow_params):
        p.data.copy_(shadow[str(i)])
    # Loaded on the CPU whatever device wrote them: the optimizer moves its state to its parameters' device.
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=False, map_location="cpu"))
    scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=False, map_location="cpu"))
    set_rng_state(torch.load(state_dir / "rng.pt", weights_only=False, map_location="cpu"), generator)
    state = json.loads((state_dir / "state.json").read_text())
    ema.optimization_step = state["ema_optimization_step"]
    return state


def newest_loadable(run_dir: Path, config) -> tuple[Path, object] | None:
    """The newest checkpoint whose training state is complete (older ones are tried if the newest is damaged)."""
    from .config import load_config

    for checkpoint in reversed(list_checkpoints(run_dir)):
        state_dir = checkpoint / TRAINING_STATE_DIR
        needed = ["model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"]
        missing = [n for n in needed if not (state_dir / n).is_file()]
        if missing:
            logger.warning("cannot resume from %s: it lacks %s (written by an older semroute?)", checkpoint, ", ".join(missing))
            continue
        try:
            saved = load_config(checkpoint / RUN_CONFIG_FILE)
            load_file(state_dir / "model.safetensors")  # reads the header and data: catches truncation
        except Exception as err:  # a damaged checkpoint must not stop us from using an older good one
            logger.warning("cannot resume from %s (%s); trying an older checkpoint", checkpoint, err)
            continue
        return checkpoint, saved
    return None


def saved_precision(checkpoint: Path) -> str | None:
    """The precision a checkpoint was trained in (None for checkpoints that predate the record)."""
    try:
        state = json.loads((checkpoint / TRAINING_STATE_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return (state.get("precision") or {}).get("name") if isinstance(state, dict) else None
