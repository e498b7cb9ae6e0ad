"""One-pass precompute of VAE latents and LayerNorm'd LLM features into safetensors shards.

Later epochs read the shards and never run the VAE or the LLM. A row keeps only its prompt's real tokens
(ragged storage: a shard holds every row's tokens end to end, `text` (T, L, C), and each row's token count,
`lengths` (R,); the mask is implied), so a cache is sized by its prompts, not by `text_encoder.max_length`,
and a batch is as long as its longest prompt (`collate_rows`). Caches of version 3 stored every row padded
to max_length with a `mask`; they still load (the padding is dropped on reading), and `semroute
convert-cache` rewrites them in place. `cache.json` records the recipe
(text encoder, resolved layers, max length, template, resolution, VAE and its factors, dtype); a cache
is refused by a run whose recipe differs, and a precompute into a directory with another recipe is
refused rather than mixed. Shards are written one at a time (temp file + rename), so an interrupted
precompute resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..base import one_line
from ..features import pad_rows
from ..fileio import file_digest, read_json, write_atomic, write_json
from ..latent import vae_factors
from ..text_encoder import TextEncoder, TextEncoderConfig

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from .images import DatasetConfig

logger = logging.getLogger(__name__)

CACHE_META = "cache.json"
# 2: the recipe names the source by content and the shard size; 3: transparent pixels are composited
# onto dataset.background, recorded in the recipe; 4: ragged rows (real tokens only, no mask)
CACHE_VERSION = 4
PADDED_VERSION = 3  # the last version that stored rows padded to max_length: read, and converted in place
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


CONVERTED_SUFFIX = ".ragged.safetensors"


def converted_name(name: str) -> str:
    """Where `convert_cache` writes the ragged copy of a padded file."""
    return name.removesuffix(".safetensors") + CONVERTED_SUFFIX


def shard_file(out: Path, number: int) -> Path:
    """Shard `number` of a cache as on disk: as precompute names it, or as `convert_cache` renamed it."""
    path = out / shard_name(number)
    converted = out / converted_name(path.name)
    return converted if converted.is_file() and not path.is_file() else path


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


def null_file(meta: dict) -> str:
    """The file of the null prompt's features (a converted cache names its own)."""
    return str(meta.get("null_file", "null.safetensors"))


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
    files.append((null_file(meta), meta.get("null_bytes"), meta.get("null_sha256"), None))
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
            found = shard_rows(f) if rows is not None else None
            layout = _layout_problem(f) if rows else None
    except Exception as err:  # safetensors raises its own error type for a damaged file
        return f"{file} cannot be read ({one_line(err, 160)})"
    if rows is not None and found != rows:
        return f"{file} holds {found} rows, the cache description says {rows}"
    return f"{file} is inconsistent: {layout}" if layout else None


def _layout_problem(f: Any) -> str | None:
    """Tensors of a shard that do not fit together (a ragged shard's lengths must add up to its tokens)."""
    names = set(f.keys())
    if "lengths" not in names:
        return None  # padded (version 3): rows of text and mask are checked by their count
    lengths = f.get_tensor("lengths")
    if lengths.dim() != 1 or bool((lengths < 0).any()):
        return "its lengths are not a list of token counts"
    shapes = {name: f.get_slice(name).get_shape() for name in ("latents", "text") if name in names}
    if set(shapes) != {"latents", "text"} or len(shapes["text"]) != 3:
        return "a shard with rows needs latents and text (T, L, C)"
    if shapes["latents"][0] != len(lengths):
        return f"{shapes['latents'][0]} latents for {len(lengths)} rows"
    if shapes["text"][0] != int(lengths.long().sum()):
        return f"its rows' lengths add up to {int(lengths.long().sum())} tokens, it holds {shapes['text'][0]}"
    return None


def shard_rows(f: Any) -> int:
    """Rows of an open shard, ragged (`lengths`) or padded (`mask`, version 3)."""
    return f.get_slice("lengths" if "lengths" in set(f.keys()) else "mask").get_shape()[0]


def shard_lengths(f: Any) -> torch.Tensor:
    """Each row's real token count (R,) int64, for a ragged or a padded shard."""
    if "lengths" in set(f.keys()):
        return f.get_tensor("lengths").long()
    return f.get_tensor("mask").sum(1).long()


def ragged_rows(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded features (R, L, S, C) and their mask (R, S) -> every row's real tokens end to end (T, L, C)
    and the rows' token counts (R,) int32: the ragged layout of a shard."""
    tokens = text.transpose(1, 2)[mask.bool()]  # (T, L, C), row by row, each row's tokens in order
    return tokens.contiguous(), mask.sum(1).to(torch.int32)


def padded_version_hint(path: Path) -> str:
    return (
        f"the cache in {path} stores rows padded to max_length (cache version {PADDED_VERSION}); convert "
        f"it in place with `semroute convert-cache {path}` (it keeps every row, drops only the padding)"
    )


class CachedDataset(torch.utils.data.Dataset):
    """Rows of a precomputed cache: (latents (C, h, w), text (L, n, C)) in the cache dtype, n = the row's own
    token count. `collate_rows` batches them padded to the batch's longest row, with the mask."""

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
        self._offsets: dict[str, list[int]] = {}  # ragged shards: where each row's tokens start

    def __len__(self) -> int:
        return len(self.index)

    def _open(self, name: str) -> Any:
        if name not in self._handles:
            f = self._handles[name] = safe_open(self.path / name, "pt")
            if "lengths" in set(f.keys()):
                self._offsets[name] = [0, *torch.cumsum(f.get_tensor("lengths").long(), 0).tolist()]
        return self._handles[name]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        name, j = self.index[i]
        f = self._open(name)
        latents = f.get_slice("latents")[j : j + 1][0]
        if name in self._offsets:  # ragged: this row's tokens only
            start, end = self._offsets[name][j], self._offsets[name][j + 1]
            return latents, f.get_slice("text")[start:end].transpose(0, 1)
        text, mask = f.get_slice("text")[j : j + 1][0], f.get_slice("mask")[j : j + 1][0]
        return latents, text[:, mask]  # padded (version 3): the padding dropped on reading

    def lengths(self) -> torch.Tensor:
        """Every row's token count (N,), in row order (a length-grouped sampler reads it)."""
        return torch.cat([shard_lengths(self._open(s["file"])) for s in self.meta["shards"]])

    def __getstate__(self) -> dict:  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}, "_offsets": {}}

    def null_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The null prompt's features (L, n, C) and mask (n,), its real tokens only."""
        with safe_open(self.path / null_file(self.meta), "pt") as f:
            if "mask" in set(f.keys()):  # padded (version 3)
                mask = f.get_tensor("mask").bool()
                text = f.get_tensor("text")[:, mask]
            else:
                text = f.get_tensor("text").transpose(0, 1)
        return text, torch.ones(text.shape[1], dtype=torch.bool)


def collate_rows(
    rows: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached rows -> latents (B, C, h, w), text (L, B, S, C) padded with zeros to the batch's longest row S,
    and the mask (B, S): the layer-major layout the DiT reads, written once."""
    text, mask = pad_rows([row for _, row in rows])
    return torch.stack([latents for latents, _ in rows]), text.transpose(0, 1), mask


class CachedEncoderInfo:
    """What training needs to know about the LLM of a cache, without loading it (an `EncoderInfo`)."""

    config: TextEncoderConfig
    layers: list[int]
    num_layers: int
    hidden_size: int
    feature_kind: str
    feature_dim: int
    kv_heads: int | None

    def __init__(self, recipe: dict, fingerprint: dict | None = None):

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
        self._fingerprint = fingerprint

    def fingerprint(self) -> dict | None:
        """The LLM's fingerprint as precompute recorded it (None for caches written before it was)."""
        return self._fingerprint


def convert_cache(path: str | Path, progress: bool = True) -> dict:
    """Rewrite a padded cache (version 3) in place as ragged rows (version 4); returns its new metadata.

    Every row keeps its latents and its real tokens, bit for bit; only the padding goes. One shard at a time:
    the ragged copy is written under a new name, cache.json then points at it (an atomic rename), and only
    then is the padded shard deleted, so a conversion killed at any point leaves a cache that loads (shards
    of both layouts read alike) and that a re-run finishes.
    """
    path = Path(path).expanduser()
    meta = read_cache_meta(path)
    version = meta["recipe"].get("version")
    if version == CACHE_VERSION:
        logger.info("%s already stores ragged rows (cache version %d)", path, version)
        return meta
    if version != PADDED_VERSION:
        raise ValueError(
            f"{path} is a cache of version {version}; this semroute converts version {PADDED_VERSION} only: "
            "precompute it again into a new directory"
        )
    problem = cache_problem(path, meta)
    if problem:
        raise ValueError(f"{problem}; nothing was converted: repair the cache (`semroute precompute`) first")
    entries = [*meta["shards"], {"file": null_file(meta), "null": True}]
    for entry in tqdm(entries, desc="convert-cache", disable=not progress):
        old = path / entry["file"]
        if old.name.endswith(CONVERTED_SUFFIX):  # converted; a kill may have left the padded file behind
            (path / (old.name.removesuffix(CONVERTED_SUFFIX) + ".safetensors")).unlink(missing_ok=True)
            continue
        with safe_open(old, "pt") as f:
            if "mask" not in set(f.keys()):
                continue  # converted by an earlier, interrupted run
            tensors = {key: f.get_tensor(key) for key in list(f.keys())}
            metadata = f.metadata() or {}
        if entry.get("null"):
            text = tensors["text"][:, tensors["mask"].bool()].transpose(0, 1)  # (n, L, C)
            new_tensors = {"text": text.contiguous()}
        else:
            text, lengths = ragged_rows(tensors["text"], tensors["mask"])
            new_tensors = {"latents": tensors["latents"], "text": text, "lengths": lengths}
        name = converted_name(old.name)
        write_atomic(path / name, partial(_save_tensors, tensors=new_tensors, metadata=metadata))
        size, digest = (path / name).stat().st_size, file_digest(path / name)
        if entry.get("null"):
            meta.update(null_file=name, null_bytes=size, null_sha256=digest)
        else:
            entry.update(file=name, bytes=size, sha256=digest)
        write_json(path / CACHE_META, meta)
        old.unlink()
    meta["recipe"]["version"] = CACHE_VERSION
    write_json(path / CACHE_META, meta)
    return meta


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, path, metadata=metadata)
