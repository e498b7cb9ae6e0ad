"""Reading and writing what a pipeline is made of: a training checkpoint's DiT, text encoder, VAE and
sampling settings, and the self-checking diffusers directory `semroute export` writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from safetensors.torch import load_file

from .base import OutputError, one_line
from .checkpoint import RUN_CONFIG_FILE, TEXT_ENCODER_FILE, VAE_FILE, WEIGHTS_FILE, default_modes
from .config import load_config
from .dit import SemanticRoutingDiT
from .fileio import read_json, record_files, recorded_problem
from .flow import SampleConfig
from .latent import load_vae
from .text_encoder import TextEncoderConfig


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
        config = TextEncoderConfig(**stored)
    except (AttributeError, TypeError):
        raise ValueError(f"text encoder description {meta} does not describe a text encoder; {fix}") from None
    if text_encoder is not None:
        config.model = text_encoder
    vae = None
    vae_meta = path / VAE_FILE
    if vae_meta.is_file():
        vae = load_vae(read_json(vae_meta, "VAE description", fix)["path"])
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipeline.save_pretrained(tmp)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(record_files(tmp), indent=1))
        dir_mode, file_mode = default_modes()
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(dir_mode if p.is_dir() else file_mode)
        if out.exists():
            out.rmdir()  # empty (checked by the caller): replaced in one step
        os.replace(tmp, out)
    except OSError as err:
        raise OutputError(
            f"could not write the pipeline {out} ({one_line(err)}); nothing was left "
            "half-written: free disk space or choose another --out"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pipeline_problem(path: Path) -> str | None:
    """A missing, truncated, altered or unparsable file of a
    pipeline directory `export_pipeline` wrote, or None."""
    manifest = path / EXPORT_MANIFEST
    if not manifest.is_file():
        return None  # not written by semroute's export: loading tells
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
