"""Reading and writing what a pipeline is made of: a training checkpoint's DiT, text encoder, VAE and
sampling settings, and the self-checking diffusers directory `semroute export` writes."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from safetensors.torch import load_file

from .base import OutputError, io_advice, one_line
from .checkpoint import RUN_CONFIG_FILE, TEXT_ENCODER_FILE, VAE_FILE, WEIGHTS_FILE, default_modes
from .config import load_config
from .dit import SemanticRoutingDiT
from .fileio import LOCK_NAME, read_json, record_files, recorded_problem
from .flow import SampleConfig
from .latent import load_vae
from .text_encoder import TextEncoderConfig

logger = logging.getLogger("semroute")


def recorded_location(value: str, checkpoint: Path) -> str:
    """A model location a checkpoint records: absolute (this release), or relative to the working directory
    its run started in (older records): tried there, then beside the run directory."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    for base in (checkpoint.parent.parent, checkpoint.parent.parent.parent):  # run dir, its parent
        if (base / path).exists():
            return str(base / path)
    return str(path)


def recorded_fingerprint(checkpoint: Path) -> dict | None:
    """The text encoder's fingerprint a checkpoint recorded (None for checkpoints older than it)."""
    record = read_json(checkpoint / TEXT_ENCODER_FILE, "the text-encoder record", "re-save the checkpoint")
    found = record.get("fingerprint") if isinstance(record, dict) else None
    return found if isinstance(found, dict) else None


def checkpoint_parts(
    path: Path, text_encoder: str | None = None
) -> tuple[SemanticRoutingDiT, TextEncoderConfig, AutoencoderKL | None, SampleConfig]:
    """What a pipeline is built from, read from a checkpoint directory written by `semroute train`: the DiT,
    the text encoder's config (`text_encoder` overrides its model path), the VAE if any, the `sample:`
    settings."""
    path = Path(path)
    meta = path / TEXT_ENCODER_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a semroute checkpoint (no {TEXT_ENCODER_FILE})")
    fix = "the checkpoint is damaged: use another checkpoint of the run"
    stored = read_json(meta, "text encoder description", fix)
    try:
        stored.pop("resolved_layers", None)
        stored.pop("fingerprint", None)
        config = TextEncoderConfig(**stored)
    except (AttributeError, TypeError):
        raise ValueError(f"text encoder description {meta} does not describe a text encoder; {fix}") from None
    if text_encoder is not None:
        config.model = text_encoder
    elif len(Path(config.model).parts) > 1 or config.model.endswith(".gguf"):  # a local path, not a name
        config.model = recorded_location(config.model, path)
    vae = None
    vae_meta = path / VAE_FILE
    if vae_meta.is_file():
        vae = load_vae(recorded_location(read_json(vae_meta, "VAE description", fix)["path"], path))
    return load_transformer(path), config, vae, _saved_sampling(path)


def load_transformer(path: Path) -> SemanticRoutingDiT:
    """The DiT of a checkpoint, strictly: a damaged file or
    another model's weights is an error, never a random init."""
    weights_file = path / WEIGHTS_FILE
    try:
        config = SemanticRoutingDiT.load_config(path)
        model = SemanticRoutingDiT.from_config(config)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"{path}/config.json is not a SemanticRoutingDiT config ({err}); point at a semroute checkpoint"
        ) from None
    try:
        weights = load_file(weights_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{weights_file} is missing; the checkpoint is incomplete") from None
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(
            f"{weights_file} cannot be read ({err}); it is truncated or not a safetensors file, "
            f"use another checkpoint of the run"
        ) from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{weights_file} holds weights of another model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} of another shape, e.g. {(missing + unexpected + wrong)[0]}); use a "
            "checkpoint written by semroute"
        )
    model.load_state_dict(weights)
    return model.eval()


EXPORT_MANIFEST = "semroute_export.json"


def export_pipeline(pipeline: DiffusionPipeline, out: Path) -> None:
    """save_pretrained into a hidden sibling, record every file's size, then rename into place: a killed
    export leaves no half-written pipeline, and a truncated file is found before loading."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_export_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipeline.save_pretrained(tmp)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(record_files(tmp), indent=1))
        dir_mode, file_mode = default_modes()
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(dir_mode if p.is_dir() else file_mode)
        if out.exists():  # empty but for the caller's lock (checked by the caller): replaced in one step
            (out / LOCK_NAME).unlink(missing_ok=True)  # the caller holds its flock until it is done
            out.rmdir()
        os.replace(tmp, out)
    except OSError as err:
        advice = io_advice(err, "check the disk and its permissions, or choose another --out")
        raise OutputError(
            f"could not write the pipeline {out} ({one_line(err)}): {advice}; nothing was left half-written"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_export_leftovers(out: Path) -> list[Path]:
    """The hidden copies that exports of `out` killed before their rename left beside it, removed (the caller
    holds the lock on `out`, so none of them is being written)."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"[A-Za-z0-9_]{8}")
    removed = []
    for candidate in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if pattern.fullmatch(candidate.name) and candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
            logger.info("removed %s, the leftover of an export that was killed", candidate)
            removed.append(candidate)
    return removed


def unrecorded_problem(path: Path) -> str | None:
    """For a pipeline directory without semroute's record of its files: a component that
    model_index.json names but whose folder, config or weights are missing, or None."""
    index = read_json(path / "model_index.json", "the pipeline index", "export the checkpoint again")
    if not isinstance(index, dict):
        return f"{path / 'model_index.json'} is not a JSON object"
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and spec[0] and spec[1]):
            continue
        folder = path / name
        if not folder.is_dir():
            missing.append(f"{folder} (a folder model_index.json names)")
        elif (folder / "config.json").is_file() and not any(
            p.suffix in (".safetensors", ".bin") for p in folder.iterdir()
        ):
            missing.append(f"the weights in {folder}")
    if missing:
        return f"{path} has no {EXPORT_MANIFEST} (the record of its files) and lacks {', '.join(missing)}"
    return None


def pipeline_problem(path: Path) -> str | None:
    """A missing, truncated, altered or unparsable file of a
    pipeline directory `export_pipeline` wrote, or None."""
    manifest = path / EXPORT_MANIFEST
    if not manifest.is_file():
        return unrecorded_problem(path)  # not written by semroute's export, or its record was lost
    record, problem = recorded_problem(path, manifest)
    if problem:
        return problem
    for name in record["files"]:
        if name.endswith(".json"):
            try:
                json.loads((path / name).read_text())
            except (OSError, ValueError) as err:
                return f"{path / name} cannot be read ({err})"
    return None


def _saved_sampling(checkpoint: Path) -> SampleConfig:
    """The `sample:` section of a checkpoint's run config
    (checkpoints without one sample with the defaults)."""
    path = checkpoint / RUN_CONFIG_FILE
    return load_config(path).sample if path.is_file() else SampleConfig()
