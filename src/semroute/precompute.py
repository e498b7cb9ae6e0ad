"""`semroute precompute`: one pass of the VAE and the LLM over a dataset into a cache (`data.cache`).

Shards are written one at a time (temp file + rename), so an interrupted precompute resumes at the first
missing shard; a directory holding another recipe is refused rather than mixed, and a damaged shard is
made again (the damaged one kept aside).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import RunConfig
from .data.cache import (
    CACHE_DTYPES,
    CACHE_META,
    CACHE_VERSION,
    PADDED_VERSION,
    cache_problems,
    cache_recipe,
    existing_meta,
    padded_version_hint,
    recipe_differences,
    shard_file,
    shard_name,
    shard_rows,
)
from .data.images import ImageCaptionDataset, to_training_tensor
from .features import NULL_PROMPT, encode_ragged
from .fileio import file_digest, write_json
from .latent import encode_latents, latent_shape, load_vae
from .runtime import configure_device, process_state, resolve_device, resolve_precision
from .text_encoder import TextEncoder, TokenCounter, check_reads

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

logger = logging.getLogger(__name__)


def _encode_images(
    dataset: ImageCaptionDataset,
    chunk: list[tuple[int, str]],
    vae: AutoencoderKL | None,
    store: torch.dtype,
    batch_size: int,
    bar: tqdm,
) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
    """The (image, caption) pairs of `chunk` whose image loads, and their latents (or pixels) in batches."""
    d = dataset.config
    kept, latents = [], []
    for b in range(0, len(chunk), batch_size):
        batch = chunk[b : b + batch_size]
        bar.update(len(batch))
        loaded = {i: dataset.load_image(i) for i, _ in batch}
        images = {i: image for i, image in loaded.items() if image is not None}
        batch = [(i, c) for i, c in batch if i in images]
        if not batch:
            continue
        pixels = torch.stack(
            [to_training_tensor(images[i], d.resolution, d.background_rgb) for i, _ in batch]
        )
        latents.append((encode_latents(vae, pixels) if vae is not None else pixels).to("cpu", store))
        kept += batch
    return kept, latents


def precompute(
    config: RunConfig,
    out: Path,
    shard_size: int = 1024,
    dtype: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
    encoder: TextEncoder | None = None,
    device: str = "auto",
) -> dict | None:
    """Encode every (image, caption) pair of `config.dataset` once; returns the cache's metadata.

    Under `accelerate launch` the processes share out the shards (shard i goes to process i mod N) and
    write the same files one process would; the main process then writes the null prompt and
    cache.json (the others return None). Images skipped while making a shard are recorded in that
    shard's own metadata, so a resumed or shared precompute reports all of them.
    dtype: storage precision; auto is the dtype `train.mixed_precision` resolves to on this machine.
    """

    if dtype not in ("auto", *CACHE_DTYPES):
        raise ValueError(f"cache dtype must be auto or one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    d = config.dataset
    if d.manifest is None and d.hf_dataset is None:
        raise ValueError("precompute needs dataset.manifest or dataset.hf_dataset in the config")
    state = process_state(device)
    run_on = state.device if device == "auto" and state.num_processes > 1 else resolve_device(device)
    configure_device(run_on)
    if dtype == "auto":
        with state.main_process_first():
            dtype = resolve_precision(config.train.mixed_precision, run_on).name
    encoder = encoder or TextEncoder(config.text_encoder, device=run_on)
    check_reads(encoder, config.text_encoder)
    vae = load_vae(d.vae, run_on) if d.vae else None
    recipe = cache_recipe(encoder, d, vae, dtype, shard_size)
    meta_path = out / CACHE_META
    found = existing_meta(meta_path)
    if found is not None:
        differences = recipe_differences(found["recipe"], recipe)
        if differences == [f"version: cache has {PADDED_VERSION}, this run has {CACHE_VERSION}"]:
            raise ValueError(f"{padded_version_hint(out)}, then run precompute again to finish or check it")
        if differences:
            raise ValueError(
                f"{out} holds a cache made another way ({'; '.join(differences)}); "
                f"precompute into a new directory instead of mixing"
            )
        if found.get("complete"):
            damaged = cache_problems(out, found, digests=True)
            if not damaged:
                logger.info("%s is already a complete cache of %d rows", out, found["rows"])
                return found
            state.wait_for_everyone()  # everyone has looked before the main process moves anything
            if state.is_main_process:
                for file, problem in damaged:  # kept aside, never deleted; the shard is made again below
                    logger.warning("%s; moving it to %s.damaged and making it again", problem, file.name)
                    if file.is_file():
                        os.replace(file, file.with_name(file.name + ".damaged"))
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(meta_path, {"recipe": recipe, "complete": False, "rows": 0, "shards": [], "skipped": {}})
    state.wait_for_everyone()

    dataset = ImageCaptionDataset(d)
    pairs = []
    for i in range(len(dataset)):
        captions = dataset.captions_of(i)
        if not captions:
            dataset.skips.add(f"row {i}", "every caption is empty", d.strict)
        pairs += [(i, c) for c in captions]
    store = CACHE_DTYPES[dtype]
    starts = list(range(0, len(pairs), shard_size))
    mine = [
        (number, start)
        for number, start in enumerate(starts)
        if number % state.num_processes == state.process_index
    ]
    bar = tqdm(  # two passes per row: its image through the VAE, its caption through the LLM
        total=2 * sum(len(pairs[s : s + shard_size]) for _, s in mine),
        desc="precompute (images, then captions)",
        disable=not progress or not state.is_main_process,
    )
    for number, start in mine:
        path = shard_file(out, number)
        chunk = pairs[start : start + shard_size]
        if path.is_file():
            bar.update(2 * len(chunk))
            continue
        before = dict(dataset.skips.skipped)
        kept, latents = _encode_images(dataset, chunk, vae, store, batch_size, bar)
        skipped = {k: v for k, v in dataset.skips.skipped.items() if k not in before}
        bar.update(len(chunk) - len(kept))  # captions of unreadable images are not encoded
        # A shard whose images were all unreadable is still written (with no rows), so it is not redone.
        tensors = {"lengths": torch.zeros(0, dtype=torch.int32)}
        if kept:
            texts = encode_ragged(
                encoder, [c for _, c in kept], batch_size, store, on_chunk=bar.update, device="cpu"
            )
            tokens = torch.cat(texts, dim=1).transpose(0, 1)  # (T, L, C): every row's real tokens end to end
            tensors = {
                "latents": torch.cat(latents),
                "text": tokens,
                "lengths": torch.tensor([text.shape[1] for text in texts], dtype=torch.int32),
            }
        path = out / shard_name(number)
        tmp = out / f".{path.name}.tmp"
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"skipped": json.dumps(skipped)}
        )
        os.replace(tmp, path)
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    shards: list[dict] = []
    skipped = dict(dataset.skips.skipped)
    for number in range(len(starts)):
        name = shard_file(out, number).name
        with safe_open(out / name, "pt") as f:
            rows = shard_rows(f)
            skipped.update(json.loads((f.metadata() or {}).get("skipped", "{}")))
        if rows:
            shards.append(
                {
                    "file": name,
                    "rows": rows,
                    "bytes": (out / name).stat().st_size,
                    "sha256": file_digest(out / name),
                }
            )
    (null,) = encode_ragged(encoder, [NULL_PROMPT], dtype=store, device="cpu")
    save_file({"text": null.transpose(0, 1).contiguous()}, out / "null.safetensors")
    rows = sum(shard["rows"] for shard in shards)
    meta = {
        "recipe": recipe,
        "text_fingerprint": encoder.fingerprint(),  # recorded in checkpoints trained on this cache
        "complete": True,
        "rows": rows,
        "shards": shards,
        "skipped": skipped,
        "null_bytes": (out / "null.safetensors").stat().st_size,
        "null_sha256": file_digest(out / "null.safetensors"),
    }
    write_json(meta_path, meta)
    if rows == 0:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise ValueError(
            f"no row was cached in {out}: every one of the {len(skipped)} images was skipped"
            + (f" ({reasons}{'; ...' if len(skipped) > 3 else ''})" if reasons else "")
            + "; there is nothing to train on: fix the images or the manifest, then precompute again"
        )
    logger.info("cached %d rows in %d shards (%d images skipped) in %s", rows, len(shards), len(skipped), out)
    return meta


def plan_cache(config: RunConfig, dtype: str = "auto", device: str = "auto") -> dict:
    """What `precompute` would write, without loading the LLM's weights, the VAE's or any image: rows, token
    counts and bytes, ragged (what is written) beside padded to max_length (what caches of version 3 took).

    Token counts come from the tokenizer alone; latent sizes from the VAE's config. Images that turn out to
    be unreadable make the real cache smaller, never larger.
    """
    d = config.dataset
    if d.manifest is None and d.hf_dataset is None:
        raise ValueError("precompute needs dataset.manifest or dataset.hf_dataset in the config")
    if dtype == "auto":
        dtype = resolve_precision(config.train.mixed_precision, resolve_device(device)).name
    store = CACHE_DTYPES[dtype]
    counter = TokenCounter(config.text_encoder)
    dataset = ImageCaptionDataset(d)
    captions = [c for i in range(len(dataset)) for c in dataset.captions_of(i)]
    if not captions:
        raise ValueError("the dataset has no captioned rows: nothing to precompute")
    tokens = torch.tensor(counter.token_counts(captions), dtype=torch.float64)
    null_tokens = counter.token_counts([NULL_PROMPT])[0]
    item = store.itemsize
    per_token = len(counter.layers) * counter.feature_dim * item
    latents = math.prod(latent_shape(d.vae, d.resolution)) * item
    rows, length = len(captions), config.text_encoder.max_length
    ragged = rows * latents + (int(tokens.sum()) + null_tokens) * per_token + 4 * rows
    padded = rows * latents + (rows + 1) * length * per_token + (rows + 1) * length
    return {
        "rows": rows,
        "dtype": dtype,
        "max_length": length,
        "tokens": {
            "mean": float(tokens.mean()),
            "p90": float(tokens.quantile(0.9)),
            "max": int(tokens.max()),
            "at_max_length": int((tokens >= length).sum()),
        },
        "bytes_per_token": per_token,
        "latent_bytes_per_row": latents,
        "bytes": ragged,
        "padded_bytes": padded,
    }
