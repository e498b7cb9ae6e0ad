"""One-pass precompute of VAE latents and LayerNorm'd LLM features into safetensors shards.

Later epochs read the shards and never run the VAE or the LLM. `cache.json` records the recipe
(text encoder, resolved layers, max length, template, resolution, VAE and its factors, dtype); a cache
is refused by a run whose recipe differs, and a precompute into a directory with another recipe is
refused rather than mixed. Shards are written one at a time (temp file + rename), so an interrupted
precompute resumes at the first missing shard.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..fileio import write_json

logger = logging.getLogger(__name__)

CACHE_META = "cache.json"
CACHE_VERSION = 1
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_recipe(encoder, dataset_config, vae, dtype: str) -> dict:
    """Everything that decides what a cached row holds."""
    from ..latent import vae_factors

    recipe = {
        "version": CACHE_VERSION,
        "text_model": encoder.config.model,
        "text_layers": list(encoder.layers),
        "configured_layers": list(encoder.config.layers),
        "text_model_layers": encoder.num_model_layers,
        "text_hidden_size": encoder.hidden_size,
        "max_length": encoder.config.max_length,
        "template": encoder.config.template,
        "resolution": dataset_config.resolution,
        "vae": None,
        "dtype": dtype,
    }
    if vae is not None:
        shift, scale = vae_factors(vae)
        recipe["vae"] = {"path": str(dataset_config.vae), "latent_channels": vae.config.latent_channels,
                         "shift_factor": shift, "scaling_factor": scale}
    return recipe


def recipe_differences(found: dict, wanted: dict) -> list[str]:
    keys = sorted(set(found) | set(wanted))
    return [f"{k}: cache has {found.get(k)!r}, this run has {wanted.get(k)!r}" for k in keys if found.get(k) != wanted.get(k)]


def _pad(hidden: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, S, C), (B, S) -> padded to S = length."""
    pad = length - hidden.shape[2]
    return F.pad(hidden, (0, 0, 0, pad)), F.pad(mask, (0, pad))


def precompute(config, out: Path, shard_size: int = 1024, dtype: str = "bf16", batch_size: int = 16,
               progress: bool = True, encoder=None) -> dict:
    """Encode every (image, caption) pair of `config.dataset` once; returns the cache's metadata."""
    from ..fusion import LayerFusion
    from ..latent import encode_latents, load_vae
    from ..pipeline import NULL_PROMPT
    from ..text_encoder import TextEncoder
    from .images import ImageCaptionDataset, to_training_tensor

    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    d = config.dataset
    if d.manifest is None and d.hf_dataset is None:
        raise ValueError("precompute needs dataset.manifest or dataset.hf_dataset in the config")
    encoder = encoder or TextEncoder(config.text_encoder)
    vae = load_vae(d.vae) if d.vae else None
    recipe = cache_recipe(encoder, d, vae, dtype)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / CACHE_META
    if meta_path.is_file():
        found = json.loads(meta_path.read_text())
        differences = recipe_differences(found["recipe"], recipe)
        if differences:
            raise ValueError(f"{out} holds a cache made another way ({'; '.join(differences)}); "
                             f"precompute into a new directory instead of mixing")
        if found.get("complete"):
            logger.info("%s is already a complete cache of %d rows", out, found["rows"])
            return found
    meta = {"recipe": recipe, "complete": False, "rows": 0, "shards": [], "skipped": {}}
    write_json(meta_path, meta)

    dataset = ImageCaptionDataset(d)
    pairs = [(i, c) for i in range(len(dataset)) for c in dataset.captions_of(i)]
    length = encoder.config.max_length
    store = CACHE_DTYPES[dtype]
    shards, rows = [], 0
    bar = tqdm(total=len(pairs), desc="precompute", disable=not progress)
    for number, start in enumerate(range(0, len(pairs), shard_size)):
        name = f"shard_{number:05d}.safetensors"
        chunk = pairs[start : start + shard_size]
        if (out / name).is_file():
            with safe_open(out / name, "pt") as f:
                n = f.get_slice("mask").get_shape()[0]
            shards.append({"file": name, "rows": n})
            rows += n
            bar.update(len(chunk))
            continue
        latents, hidden, masks = [], [], []
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b : b + batch_size]
            bar.update(len(batch))
            images = {i: dataset.load_image(i) for i, _ in batch}
            batch = [(i, c) for i, c in batch if images[i] is not None]
            if not batch:
                continue
            pixels = torch.stack([to_training_tensor(images[i], d.resolution) for i, _ in batch])
            latents.append((encode_latents(vae, pixels) if vae is not None else pixels).to(store))
            h, m = encoder([c for _, c in batch])
            h, m = _pad(LayerFusion.normalize(h).transpose(0, 1), m, length)
            hidden.append(h.to(store))
            masks.append(m)
        if not latents:
            continue
        tensors = {"latents": torch.cat(latents), "text": torch.cat(hidden), "mask": torch.cat(masks)}
        tmp = out / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, out / name)
        shards.append({"file": name, "rows": len(tensors["mask"])})
        rows += len(tensors["mask"])
    bar.close()
    h, m = encoder([NULL_PROMPT])
    h, m = _pad(LayerFusion.normalize(h).transpose(0, 1), m, length)
    save_file({"text": h[0].to(store).contiguous(), "mask": m[0].contiguous()}, out / "null.safetensors")
    meta.update(complete=True, rows=rows, shards=shards, skipped=dataset.skips.skipped)
    write_json(meta_path, meta)
    logger.info("cached %d rows in %d shards (%d images skipped) in %s", rows, len(shards), len(dataset.skips), out)
    return meta


def read_cache_meta(path: Path) -> dict:
    meta_path = path / CACHE_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a semroute cache (no {CACHE_META}); make one with `semroute precompute`")
    meta = json.loads(meta_path.read_text())
    if not meta.get("complete"):
        raise ValueError(f"the cache in {path} is incomplete; run `semroute precompute` again to finish it")
    return meta


class CachedDataset(torch.utils.data.Dataset):
    """Rows of a precomputed cache: (latents (C, h, w), text (L, S, C), mask (S,)) in the cache dtype."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.meta = read_cache_meta(self.path)
        self.index = [(s["file"], j) for s in self.meta["shards"] for j in range(s["rows"])]
        if not self.index:
            raise ValueError(f"the cache in {self.path} has no rows")
        self._handles = {}

    def __len__(self) -> int:
        return len(self.index)

    def _open(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(self.path / name, "pt")
        return self._handles[name]

    def __getitem__(self, i: int):
        name, j = self.index[i]
        f = self._open(name)
        return tuple(f.get_slice(key)[j : j + 1][0] for key in ("latents", "text", "mask"))

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}

    def null_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(self.path / "null.safetensors", "pt") as f:
            return f.get_tensor("text"), f.get_tensor("mask")
