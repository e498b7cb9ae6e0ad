"""One-pass precompute of VAE latents and LayerNorm'd LLM features into safetensors shards.

Later epochs read the shards and never run the VAE or the LLM. `cache.json` records the recipe
(text encoder, resolved layers, max length, template, resolution, VAE and its factors, dtype); a cache
is refused by a run whose recipe differs, and a precompute into a directory with another recipe is
refused rather than mixed. Shards are written one at a time (temp file + rename), so an interrupted
precompute resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from ..base import one_line
from ..fileio import file_digest, read_json
from ..latent import vae_factors
from ..text_encoder import TextEncoder, TextEncoderConfig

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from .images import DatasetConfig

logger = logging.getLogger(__name__)

CACHE_META = "cache.json"
# 2: the recipe names the source by content and the shard size; 3: transparent pixels are composited
# onto dataset.background, recorded in the recipe
CACHE_VERSION = 3
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def source_identity(dataset_config: DatasetConfig) -> dict:
    """Which data a cache was made from, by content: the manifest's or the saved dataset's files hashed."""
    d = dataset_config
    if d.manifest is not None:
        files = [Path(d.manifest).expanduser()]
        kind, path = "manifest", d.manifest
    else:
        path = str(d.hf_dataset)
        files = sorted(Path(path).expanduser().glob("*.json"))  # state.json carries the dataset's fingerprint
        kind = "hf_dataset"
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return {
        "kind": kind,
        "path": str(path),
        "sha256": digest.hexdigest(),
        "image_root": d.image_root,
        "image_key": d.image_key,
        "text_key": d.text_key,
    }


def cache_recipe(
    encoder: TextEncoder,
    dataset_config: DatasetConfig,
    vae: AutoencoderKL | None,
    dtype: str,
    shard_size: int | None = None,
) -> dict:
    """Everything that decides what a cached row holds, and which rows are in which shard."""

    recipe = {
        "source": source_identity(dataset_config),
        "shard_size": shard_size,
        "version": CACHE_VERSION,
        "text_model": encoder.config.model,
        "text_layers": list(encoder.layers),
        "configured_layers": list(encoder.config.layers),
        "text_model_layers": encoder.num_model_layers,
        "text_hidden_size": encoder.hidden_size,
        "max_length": encoder.config.max_length,
        "template": encoder.config.template,
        "resolution": dataset_config.resolution,
        "background": list(dataset_config.background_rgb),  # as JSON reads it back
        "vae": None,
        "dtype": dtype,
    }
    if encoder.feature_kind != "hidden_states":  # (absent from older caches, all of hidden states)
        recipe.update(
            text_features=encoder.feature_kind,
            text_feature_dim=encoder.feature_dim,
            text_kv_heads=encoder.kv_heads,
        )
    if vae is not None:
        shift, scale = vae_factors(vae)
        recipe["vae"] = {
            "path": str(dataset_config.vae),
            "latent_channels": vae.config["latent_channels"],
            "shift_factor": shift,
            "scaling_factor": scale,
        }
    return recipe


def recipe_differences(found: dict, wanted: dict) -> list[str]:
    keys = sorted(set(found) | set(wanted))
    return [
        f"{k}: cache has {found.get(k)!r}, this run has {wanted.get(k)!r}"
        for k in keys
        if found.get(k) != wanted.get(k)
    ]


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


def existing_meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        raise ValueError(
            f"{path} is not valid JSON; it is damaged: precompute into a new directory"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), dict):
        raise ValueError(f"{path} is not a semroute cache description; precompute into a new directory")
    return meta


def read_cache_meta(path: Path) -> dict:

    meta_path = path / CACHE_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a semroute cache (no {CACHE_META}); make one with `semroute precompute`"
        )
    meta = read_json(
        meta_path, "cache description", "the cache is damaged: precompute it again into a new directory"
    )
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("recipe"), dict)
        or not isinstance(meta.get("shards", []), list)
    ):
        raise ValueError(
            f"{meta_path} is not a semroute cache description; precompute the cache again into a new "
            "directory"
        )
    if not meta.get("complete"):
        raise ValueError(f"the cache in {path} is incomplete; run `semroute precompute` again to finish it")
    return meta


def cache_problem(path: Path, meta: dict, digests: bool = False) -> str | None:
    """A missing, truncated, altered or unreadable file of a complete cache, or None.

    digests: also compare each file's sha256 with the one written (reads the whole cache: `precompute` does it
    before calling a cache complete; training, which may open terabytes, checks sizes and headers).
    """
    problems = cache_problems(path, meta, digests)
    return problems[0][1] if problems else None


def cache_problems(path: Path, meta: dict, digests: bool = False) -> list[tuple[Path, str]]:
    """(file, why) for every damaged file of a complete cache."""
    shards = [s if isinstance(s, dict) else {} for s in meta["shards"]]
    files = [(s.get("file"), s.get("bytes"), s.get("sha256"), s.get("rows")) for s in shards]
    files.append(("null.safetensors", meta.get("null_bytes"), meta.get("null_sha256"), None))
    problems = []
    for name, size, digest, rows in files:
        file = path / str(name)
        problem = _file_problem(file, size, digest if digests else None, rows)
        if problem:
            problems.append((file, problem))
    return problems


def _file_problem(file: Path, size: object, digest: object, rows: object) -> str | None:
    if not file.is_file():
        return f"{file} is missing"
    if size is not None and file.stat().st_size != size:
        return f"{file} is truncated or damaged ({file.stat().st_size} bytes, written as {size})"
    if digest is not None and file_digest(file) != digest:
        return f"{file} is damaged: its bytes differ from those written (sha256 mismatch)"
    try:
        with safe_open(file, "pt") as f:
            found = f.get_slice("mask").get_shape()[0] if rows is not None else None
    except Exception as err:  # safetensors raises its own error type for a damaged file
        return f"{file} cannot be read ({one_line(err, 160)})"
    if rows is not None and found != rows:
        return f"{file} holds {found} rows, the cache description says {rows}"
    return None


class CachedDataset(torch.utils.data.Dataset):
    """Rows of a precomputed cache: (latents (C, h, w), text (L, S, C), mask (S,)) in the cache dtype."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.meta = read_cache_meta(self.path)
        problem = cache_problem(self.path, self.meta)
        if problem:
            raise ValueError(
                f"{problem}; delete the damaged file and run `semroute precompute` again with the same "
                "config (it redoes only what is missing)"
            )
        self.index = [(s["file"], j) for s in self.meta["shards"] for j in range(s["rows"])]
        if not self.index:
            raise ValueError(f"the cache in {self.path} has no rows")
        self._handles: dict[str, Any] = {}  # safetensors handles, opened on first use

    def __len__(self) -> int:
        return len(self.index)

    def _open(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = safe_open(self.path / name, "pt")
        return self._handles[name]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name, j = self.index[i]
        f = self._open(name)
        return tuple(f.get_slice(key)[j : j + 1][0] for key in ("latents", "text", "mask"))

    def __getstate__(self) -> dict:  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}

    def null_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(self.path / "null.safetensors", "pt") as f:
            return f.get_tensor("text"), f.get_tensor("mask")


class CachedEncoderInfo:
    """What training needs to know about the LLM of a cache, without loading it (an `EncoderInfo`)."""

    config: TextEncoderConfig
    layers: list[int]
    num_layers: int
    hidden_size: int
    feature_kind: str
    feature_dim: int
    kv_heads: int | None

    def __init__(self, recipe: dict):

        self.feature_kind = recipe.get("text_features", "hidden_states")
        self.config = TextEncoderConfig(
            model=recipe["text_model"],
            layers=list(recipe["configured_layers"]),
            max_length=recipe["max_length"],
            template=recipe["template"],
            features=self.feature_kind,
        )
        self.layers = list(recipe["text_layers"])
        self.num_layers = len(self.layers)
        self.hidden_size = recipe["text_hidden_size"]
        self.feature_dim = recipe.get("text_feature_dim", self.hidden_size)
        self.kv_heads = recipe.get("text_kv_heads")
