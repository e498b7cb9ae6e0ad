"""Crash-safe checkpoints and exact resume.

A checkpoint is written into a hidden temporary directory, every file and the directory are
fsync'ed, and only then is it renamed to `checkpoints/step_NNNNNN`: a process killed at any moment
leaves either the previous checkpoints alone or a complete new one (plus a hidden leftover that the
next run removes). The newest K are kept. A checkpoint whose weights are not all finite is refused.

Layout: config.json + diffusion_pytorch_model.safetensors (EMA weights, diffusers format),
text_encoder.json, run_config.yaml, [vae.json], training_state/{model.safetensors, ema.safetensors,
optimizer.pt, scheduler.pt, rng.pt, state.json}, and checkpoint.json, written last, with the size of
every other file: a truncated or missing file is found without reading the tensors, and a damaged
checkpoint falls back to the one before it. A run directory whose checkpoints exist but cannot be
read is refused, never restarted over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .base import OutputError, TrainingDiverged, io_advice, one_line
from .config import load_yaml
from .fileio import read_json, record_files, recorded_problem

if TYPE_CHECKING:
    from collections.abc import Iterable

    from diffusers.training_utils import EMAModel

    from .config import RunConfig
    from .dit import SemanticRoutingDiT
    from .text_encoder import EncoderInfo

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"
TRAINING_STATE_DIR = "training_state"
TEXT_ENCODER_FILE = "text_encoder.json"
VAE_FILE = "vae.json"
STEP_PREFIX = "step_"
MANIFEST_FILE = "checkpoint.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' name for the EMA weights
CHECKPOINTS_DIR = "checkpoints"  # under a run directory
SUMMARY_FILE = "summary.json"  # a run's summary, beside its checkpoints
# What sampling reads, and what a resume reads besides.
INFERENCE_FILES = ("config.json", WEIGHTS_FILE, TEXT_ENCODER_FILE, RUN_CONFIG_FILE)
TRAINING_FILES = tuple(
    f"{TRAINING_STATE_DIR}/{name}"
    for name in (
        "model.safetensors",
        "ema.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
        "state.json",
    )
)


def default_modes() -> tuple[int, int]:
    """(directory, file) permissions new files get here: 0o777 / 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask, 0o666 & ~umask


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


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@dataclass
class TrainingSnapshot:
    """A run's full state on the CPU, unsharded: what a checkpoint holds (gathered under FSDP)."""

    weights: dict[str, torch.Tensor]  # the model's state dict
    ema: list[torch.Tensor]  # the EMA shadow of each parameter, in `model.parameters()` order
    optimizer: dict  # the optimizer's state dict, keyed by parameter index

    def ema_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The EMA weights as `model`'s state dict (buffers are not averaged): what sampling loads."""
        names = [name for name, _ in model.named_parameters()]
        if len(names) != len(self.ema):
            raise ValueError(f"{len(self.ema)} EMA tensors for {len(names)} parameters")
        return {**self.weights, **dict(zip(names, self.ema, strict=True))}


def snapshot_of(model: torch.nn.Module, ema: EMAModel, optimizer: torch.optim.Optimizer) -> TrainingSnapshot:
    """The state of a run whose model is not sharded."""
    return TrainingSnapshot(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        [p.detach().cpu().contiguous() for p in ema.shadow_params],
        optimizer.state_dict(),
    )


def save_checkpoint(
    directory: Path,
    model: SemanticRoutingDiT,
    ema: EMAModel | None,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    config: RunConfig,
    encoder: EncoderInfo,
    vae_path: str | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    rng: dict | None = None,
    snapshot: TrainingSnapshot | None = None,
) -> Path:
    """Write a checkpoint atomically; `state` holds at least {"step": N} and is stored as
    training_state/state.json.

    snapshot: the run's full state, gathered beforehand (a sharded run); by default read from `model`, `ema`
    and `optimizer`. `model` then only gives its config."""
    if snapshot is None:
        if ema is None or optimizer is None:
            raise ValueError("pass ema and optimizer, or a snapshot")
        snapshot = snapshot_of(model, ema, optimizer)
    weights, ema_weights = snapshot.weights, snapshot.ema_weights(model)
    if not all_finite(weights.values()) or not all_finite(snapshot.ema):
        raise TrainingDiverged(
            f"the weights at step {state['step']} are not all finite; no checkpoint was written"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_config(tmp)  # diffusers' layout: config.json + the weights file, as save_pretrained writes
        save_file(ema_weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        state_dir = tmp / TRAINING_STATE_DIR
        state_dir.mkdir()
        save_file(weights, state_dir / "model.safetensors")
        save_file({str(i): p for i, p in enumerate(snapshot.ema)}, state_dir / "ema.safetensors")
        torch.save(snapshot.optimizer, state_dir / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
        if rng is not None:
            torch.save(rng, state_dir / "rng.pt")
        ema_step = state.get("ema_optimization_step", ema.optimization_step if ema is not None else 0)
        (state_dir / "state.json").write_text(json.dumps({**state, "ema_optimization_step": ema_step}))
        # The layers as configured (empty = all) and as resolved for this model.
        (tmp / TEXT_ENCODER_FILE).write_text(json.dumps(encoder_record(encoder), indent=2))
        config.save(tmp / RUN_CONFIG_FILE)
        if vae_path is not None:
            where = Path(vae_path).expanduser()  # absolute: the record holds from any working directory
            (tmp / VAE_FILE).write_text(
                json.dumps({"path": str(where.resolve() if where.exists() else where)})
            )
        (tmp / MANIFEST_FILE).write_text(json.dumps(record_files(tmp), indent=1))
        dir_mode, file_mode = default_modes()  # mkdtemp made it 0700
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(dir_mode if path.is_dir() else file_mode)
        _fsync_tree(tmp)
        if directory.exists():  # only when a step is saved twice; the older copy goes
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        _fsync(directory.parent)
    except Exception as err:  # the libraries raise their own types for a full disk or a file-size limit
        advice = io_advice(err, "check the disk and its permissions")
        raise OutputError(
            f"could not write the checkpoint {directory} ({one_line(err)}): {advice}; the earlier "
            f"checkpoints are untouched: run the same command again to resume"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where a run keeps its checkpoint of `step`."""
    return run_dir / CHECKPOINTS_DIR / f"{STEP_PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints of a run, oldest first (a `step_*` directory exists only once written whole)."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir()), key=lambda p: p.name)


def checkpoint_problem(
    checkpoint: Path, files: tuple[str, ...] = INFERENCE_FILES + TRAINING_FILES
) -> str | None:
    """Why `files` of a checkpoint cannot be used (missing, truncated, altered or unparsable), or None if they
    can.

    Sizes and sha256 digests are checked against checkpoint.json; checkpoints written before it have their
    files opened.
    """
    manifest = checkpoint / MANIFEST_FILE
    record: dict = {}
    if manifest.is_file():
        record, problem = recorded_problem(checkpoint, manifest, files)
        if problem:
            return problem
    for name in files:
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        problem = _unreadable(path) if not record or path.suffix in (".json", ".yaml") else None
        if problem:
            return f"{path} cannot be read ({problem})"
    return None


def _unreadable(path: Path) -> str | None:
    """Open one checkpoint file the way it will be loaded; the error, or None."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            load_yaml(path.read_text(), str(path))
        elif path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    f.get_tensor(key)
        elif path.suffix == ".pt":
            load_torch_file(path)
    except Exception as err:  # each library has its own error types for a damaged file
        return one_line(err, 200) or type(err).__name__
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` (>= 1) checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(run_dir: Path) -> None:
    """Hidden temporary directories of checkpoint writes that were killed: never complete, safe to delete."""
    root = run_dir / CHECKPOINTS_DIR
    for tmp in root.glob(f".{STEP_PREFIX}*") if root.is_dir() else []:
        logger.info("removing %s, left by an interrupted checkpoint write", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def load_raw_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The non-EMA training weights of a checkpoint."""
    return load_file(checkpoint / TRAINING_STATE_DIR / "model.safetensors")


def encoder_record(encoder: EncoderInfo) -> dict:
    """What a checkpoint records of its text encoder: its config (a local model path made absolute, so the
    record holds from any working directory), the layers as resolved, and its fingerprint."""
    config = encoder.config.to_dict()
    model = Path(str(config["model"])).expanduser()
    if model.exists():
        config["model"] = str(model.resolve())
    record = {**config, "resolved_layers": encoder.layers}
    fingerprint = encoder.fingerprint()
    return record if fingerprint is None else {**record, "fingerprint": fingerprint}


def routed_layers(checkpoint: Path) -> list[int]:
    """The LLM layers (1-based) a checkpoint's fusion reads, in the order of its weights."""
    record = read_json(checkpoint / TEXT_ENCODER_FILE, "the text-encoder record", "re-save the checkpoint")
    return list(record["resolved_layers"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint that can be sampled from)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / TEXT_ENCODER_FILE).exists() or (path / MANIFEST_FILE).exists():
        problem = checkpoint_problem(path, INFERENCE_FILES)
        if problem:
            raise ValueError(
                f"{problem}; this checkpoint cannot be used: point at another checkpoint of the run "
                f"(or at the run directory, which picks its newest good one)"
            )
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with checkpoints/step_*")
    for checkpoint in reversed(found):
        problem = checkpoint_problem(checkpoint, INFERENCE_FILES)
        if problem is None:
            return checkpoint
        logger.warning("skipping %s: %s", checkpoint.name, problem)
    raise ValueError(
        f"no checkpoint in {path} can be used (the newest: {checkpoint_problem(found[-1], INFERENCE_FILES)})"
    )


def load_torch_file(path: Path) -> Any:
    """A .pt file of a checkpoint, unpickled with torch's weights-only loader: tensors, containers and numbers
    only, plus numpy's array rebuilding for the saved numpy RNG state. A file made to run code when loaded is
    refused.

    Loaded on the CPU whatever device wrote it: the optimizer moves its state to its parameters' device.
    """

    numpy_rng = [
        np._core.multiarray._reconstruct,  # type: ignore[attr-defined]  # private in numpy's stubs
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
    with torch.serialization.safe_globals(numpy_rng):
        return torch.load(path, weights_only=True, map_location="cpu")
