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
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..base import one_line
from ..features import NULL_PROMPT
from ..fileio import file_digest, read_json, write_json
from ..latent import encode_latents, load_vae, vae_factors
from ..runtime import configure_device, process_state, resolve_device, resolve_precision
from ..text_encoder import TextEncoder, TextEncoderConfig, check_reads
from .images import ImageCaptionDataset, to_training_tensor

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from ..config import RunConfig
    from .images import DatasetConfig

logger = logging.getLogger(__name__)

CACHE_META = "cache.json"
CACHE_VERSION = 2  # 2: the recipe names the source by content and the shard size
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
    found = _read_meta(meta_path)
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
        path = out / _shard_name(number)
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
            pixels = torch.stack([to_training_tensor(images[i], d.resolution) for i, _ in batch])
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
        name = _shard_name(number)
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


def _shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


def _read_meta(path: Path) -> dict | None:
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
