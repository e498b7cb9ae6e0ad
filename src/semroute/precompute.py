"""`semroute precompute`: one pass of the VAE and the LLM over a dataset into a cache (`data.cache`).

Shards are written one at a time (temp file + rename), so an interrupted precompute resumes at the first
missing shard; a directory holding another recipe is refused rather than mixed, and a damaged shard is
made again (the damaged one kept aside).
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

from .config import RunConfig
from .data.cache import (
    CACHE_DTYPES,
    CACHE_META,
    cache_problems,
    cache_recipe,
    existing_meta,
    recipe_differences,
    shard_name,
)
from .data.images import ImageCaptionDataset, to_training_tensor
from .features import NULL_PROMPT
from .fileio import file_digest, write_json
from .latent import encode_latents, load_vae
from .runtime import configure_device, process_state, resolve_device, resolve_precision
from .text_encoder import TextEncoder, check_reads

logger = logging.getLogger(__name__)


def _pad(hidden: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, S, C), (B, S) -> padded to S = length."""
    pad = length - hidden.shape[2]
    return F.pad(hidden, (0, 0, 0, pad)), F.pad(mask, (0, pad))


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
    length = encoder.config.max_length
    store = CACHE_DTYPES[dtype]
    starts = list(range(0, len(pairs), shard_size))
    mine = [
        (number, start)
        for number, start in enumerate(starts)
        if number % state.num_processes == state.process_index
    ]
    bar = tqdm(
        total=sum(len(pairs[s : s + shard_size]) for _, s in mine),
        desc="precompute",
        disable=not progress or not state.is_main_process,
    )
    for number, start in mine:
        path = out / shard_name(number)
        chunk = pairs[start : start + shard_size]
        if path.is_file():
            bar.update(len(chunk))
            continue
        latents, hidden, masks = [], [], []
        before = dict(dataset.skips.skipped)
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
            h, m = encoder.features([c for _, c in batch])
            h, m = _pad(h.transpose(0, 1), m, length)
            hidden.append(h.to("cpu", store))
            masks.append(m.cpu())
        skipped = {k: v for k, v in dataset.skips.skipped.items() if k not in before}
        # A shard whose images were all unreadable is still written (with no rows), so it is not redone.
        tensors = {"mask": torch.cat(masks) if masks else torch.zeros(0, length, dtype=torch.bool)}
        if latents:
            tensors.update(latents=torch.cat(latents), text=torch.cat(hidden))
        tmp = out / f".{path.name}.tmp"
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"skipped": json.dumps(skipped)}
        )
        os.replace(tmp, path)
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    shards, skipped = [], dict(dataset.skips.skipped)
    for number in range(len(starts)):
        name = shard_name(number)
        with safe_open(out / name, "pt") as f:
            rows = f.get_slice("mask").get_shape()[0]
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
    h, m = encoder.features([NULL_PROMPT])
    h, m = _pad(h.transpose(0, 1), m, length)
    save_file(
        {"text": h[0].to("cpu", store).contiguous(), "mask": m[0].cpu().contiguous()},
        out / "null.safetensors",
    )
    rows = sum(shard["rows"] for shard in shards)
    meta = {
        "recipe": recipe,
        "complete": True,
        "rows": rows,
        "shards": shards,
        "skipped": skipped,
        "null_bytes": (out / "null.safetensors").stat().st_size,
        "null_sha256": file_digest(out / "null.safetensors"),
    }
    write_json(meta_path, meta)
    logger.info("cached %d rows in %d shards (%d images skipped) in %s", rows, len(shards), len(skipped), out)
    return meta
