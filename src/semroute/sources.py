"""Where training batches come from: the shapes task, images + captions, or a precomputed cache.

Each is a `BatchSource`; the trainer uses only the protocol, never asks which one it has, and applies
caption dropout itself (`features.drop_captions`) with the null prompt's features the source gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .data.cache import CachedDataset, CachedEncoderInfo, collate_rows, recipe_differences
from .data.images import ImageCaptionDataset, collate_skipping
from .data.shapes import ShapesDataset, ShapesTask, caption
from .features import NULL_PROMPT, PromptFeatures, prompt_table
from .latent import check_vae_matches, encode_latents, load_vae
from .text_encoder import EncoderInfo, check_reads, resolve_layers

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .config import RunConfig
    from .text_encoder import TextEncoder


@dataclass
class Preview:
    """Prompts to draw sample grids of a run in progress,
    with their features (no LLM call at a checkpoint)."""

    captions: list[str]
    features: PromptFeatures  # the captions' rows, then the null prompt's


class BatchSource(Protocol):
    """What the trainer draws batches from.

    A batch is whatever `loader()` yields; `condition` turns it into DiT inputs on `device`:
    clean inputs x0 (B, C, H, W), LN'd LLM layers (L, B, S, C) in the training dtype and a mask (B, S).
    """

    @property
    def encoder(self) -> EncoderInfo:
        """The LLM as the DiT must know it (a cache describes it without loading it)."""

    @property
    def null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The null prompt's LN'd layers (L, S, C) and mask (S,): caption dropout's target."""

    @property
    def vae_path(self) -> str | None:
        """Recorded with checkpoints, so that sampling decodes as training encoded."""

    def loader(self, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader: ...

    def set_epoch(self, epoch: int) -> None:
        """Order the data for `epoch` (a function of the seed and the epoch, for exact resume)."""

    def condition(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, text, mask) on `device`; new tensors the trainer
        may write to (caption dropout does, in place)."""

    def skipped(self) -> dict[str, str]:
        """Images that could not be used, with why."""

    def preview(self) -> Preview | None:
        """Prompts for sample grids at checkpoints, or None where the source has none."""


def own_generator(seed: int) -> torch.Generator:
    """A loader's own RNG: each new loader iterator draws its worker seed from it, not from torch's global
    RNG.

    Otherwise a resumed run, which starts an extra iterator, ends with another global RNG state than an
    uninterrupted one. Items never depend on the worker seed: they are functions of (seed, index, epoch).
    """
    return torch.Generator().manual_seed(seed + 7_919)


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation per epoch from (seed, epoch): the data
    order is a function of the step, for exact resume."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class LengthGroupedShuffle(EpochShuffle):
    """EpochShuffle's permutation, regrouped so that a batch's rows have similar text lengths.

    The full batches of the permutation (the rows the plain sampler's batches visit) are cut into windows of
    `window` batches; each window is sorted by length and cut into batches; the batches are shuffled. The
    remainder that drop_last drops stays last. A function of (seed, epoch), as EpochShuffle is.
    """

    def __init__(self, lengths: torch.Tensor, seed: int, batch_size: int, window: int) -> None:
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size, self.window = lengths, batch_size, window

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)
        full = self.n - self.n % self.batch_size
        body, tail = order[:full], order[full:]
        span = self.window * self.batch_size
        batches = []
        for start in range(0, full, span):
            window = body[start : start + span]
            window = window[torch.argsort(self.lengths[window], stable=True)]
            batches += list(window.split(self.batch_size))
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter(torch.cat([*shuffled, tail]).tolist())


class ShapesSource:
    """Endless deterministic shapes scenes; captions are ids into a feature table computed once."""

    vae_path = None

    def __init__(
        self,
        config: RunConfig,
        encoder: TextEncoder,
        features: PromptFeatures | None,
        progress: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dataset = ShapesDataset(ShapesTask(config.data), seed=config.train.seed)
        if features is None:
            features = prompt_table(encoder, self.dataset.captions, dtype, progress)
        elif features.hidden.shape[0] != len(self.dataset.captions) + 1:
            raise ValueError(
                f"features hold {features.hidden.shape[0]} prompts; this data config has "
                f"{len(self.dataset.captions)} + the null prompt"
            )
        elif tuple(features.hidden.shape[1:2]) + tuple(features.hidden.shape[3:]) != (
            encoder.num_layers,
            encoder.feature_dim,
        ):
            raise ValueError(
                f"features hold {features.hidden.shape[1]} entries of width {features.hidden.shape[3]}; the "
                f"text encoder gives {encoder.num_layers} of width {encoder.feature_dim} "
                f"({encoder.feature_kind})"
            )
        self.features = features.to(dtype)
        self.encoder = encoder
        # The null prompt's real tokens only: a batch is padded to its own longest prompt.
        null_mask = self.features.mask[-1]
        self.null = (self.features.hidden[-1][:, null_mask], null_mask[null_mask])

    def loader(self, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
        # Items are drawn from rng(seed, index): the order is already fixed, every epoch alike.
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            generator=own_generator(self.dataset.seed),
        )

    def set_epoch(self, epoch: int) -> None:
        pass

    def condition(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x0, ids = batch
        text, mask = self.features.select(ids.cpu())
        return x0, text.to(device), mask.to(device)

    def skipped(self) -> dict[str, str]:
        return {}

    def preview(self) -> Preview:
        """The task's display scenes that training knows (held-out benchmark prompts have no features)."""
        known = set(self.dataset.captions)
        captions = [caption(scene) for scene in self.dataset.task.display_scenes() if caption(scene) in known]
        ids = torch.tensor([self.dataset.captions.index(c) for c in captions] + [len(self.dataset.captions)])
        return Preview(captions, PromptFeatures(self.features.hidden[ids], self.features.mask[ids]))


class ImageSource:
    """Images + captions through the VAE (or pixels) and the LLM, every step."""

    def __init__(
        self,
        config: RunConfig,
        encoder: TextEncoder,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        d = config.dataset
        self.dataset = ImageCaptionDataset(d, seed=config.train.seed)
        self.encoder = encoder
        self.vae = load_vae(d.vae, device) if d.vae else None
        self.vae_path = d.vae
        model = config.model.settings()
        if self.vae is not None:
            check_vae_matches(self.vae, model["in_channels"], model["sample_size"], d.resolution)
        self.sampler = EpochShuffle(len(self.dataset), config.train.seed)
        self.dtype = dtype
        _check_usable(self.dataset)
        hidden, mask = encoder.features([NULL_PROMPT])
        self.null = (hidden[:, 0].to(dtype), mask[0])

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = self.dataset.epoch = epoch

    def loader(self, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
        _check_size(len(self.dataset), batch_size)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            collate_fn=collate_skipping,
            generator=own_generator(self.sampler.seed),
        )

    def condition(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels, captions = batch
        x0 = encode_latents(self.vae, pixels) if self.vae is not None else pixels
        hidden, mask = self.encoder.features(list(captions))
        return x0.to(device), hidden.to(device, self.dtype), mask.to(device)

    def skipped(self) -> dict[str, str]:
        return dict(self.dataset.skips.skipped)

    def preview(self) -> None:
        return None


class CacheSource:
    """Rows of a `semroute precompute` cache: a step never runs the VAE or the LLM."""

    def __init__(self, config: RunConfig, dataset: CachedDataset, dtype: torch.dtype = torch.float32) -> None:
        d = config.dataset
        self.dataset = dataset
        recipe = dataset.meta["recipe"]
        differences = recipe_differences(recipe, _recipe_from_config(config, recipe))
        if differences:
            raise ValueError(
                f"the cache in {d.cache} was made another way than this run: {'; '.join(differences)}; "
                f"precompute a new cache for this config"
            )
        model = config.model.settings()
        channels = recipe["vae"]["latent_channels"] if recipe["vae"] else 3
        if channels != model["in_channels"]:
            raise ValueError(
                f"the cache holds {channels}-channel inputs but model.in_channels is {model['in_channels']}"
            )
        self.encoder = CachedEncoderInfo(recipe, dataset.meta.get("text_fingerprint"))
        self.vae_path = recipe["vae"]["path"] if recipe["vae"] else None
        self.dtype = dtype  # the training precision's, whatever the cache stores: no bf16 math in an fp32 run
        null_text, null_mask = dataset.null_features()
        self.null = (null_text.to(dtype), null_mask)
        training = config.train
        self.sampler = (
            LengthGroupedShuffle(
                dataset.lengths(), training.seed, training.batch_size, training.length_grouping
            )
            if training.length_grouping
            else EpochShuffle(len(dataset), training.seed)
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def loader(self, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
        _check_size(len(self.dataset), batch_size)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            collate_fn=collate_rows,  # each batch as long as its longest prompt
            generator=own_generator(self.sampler.seed),
        )

    def condition(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents, text, mask = batch  # (B, C, h, w), (L, B, S, C), (B, S)
        return latents.float().to(device), text.to(device, self.dtype), mask.to(device)

    def skipped(self) -> dict[str, str]:
        return {}

    def preview(self) -> None:
        return None


PROBE_ITEMS = 32


def _check_usable(dataset: ImageCaptionDataset) -> None:
    """At least one of the first rows decodes and has a caption:
    a source of nothing is an error now, not a loop later."""
    n = min(len(dataset), PROBE_ITEMS)
    if not any(dataset.captions_of(i) and dataset.load_image(i) is not None for i in range(n)):
        reasons = sorted(set(dataset.skips.skipped.values()))[:3]
        raise ValueError(
            f"none of the first {n} rows of the dataset can be used ({'; '.join(reasons) or 'no caption'}); "
            f"check dataset.image_key / dataset.text_key and the image files"
        )


def _check_size(n: int, batch_size: int) -> None:
    # Full batches only (the last partial batch of an epoch is dropped): every step sees batch_size images.
    if n < batch_size:
        raise ValueError(
            f"the dataset has {n} usable rows, fewer than train.batch_size {batch_size}; lower the batch size"
        )


def build_source(
    config: RunConfig,
    encoder_factory: Callable[[], TextEncoder],
    features: PromptFeatures | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> BatchSource:
    """The batch source the config asks for. `encoder_factory()` loads the LLM (not called for a cache).

    dtype: what the LN'd text features are handed to the DiT in (the training precision's dtype).
    device: where a VAE runs (the LLM is placed by `encoder_factory`).
    """
    d = config.dataset
    if d.cache is not None:
        return CacheSource(config, CachedDataset(d.cache), dtype)
    if config.train.length_grouping:
        raise ValueError(
            "train.length_grouping groups the rows of a precomputed cache by their stored lengths; "
            "precompute one (`semroute precompute`, then dataset.cache) or set train.length_grouping: 0"
        )
    encoder = encoder_factory()
    check_reads(
        encoder, config.text_encoder, f"this run (model.strategy {config.model.settings()['strategy']})"
    )
    if d.active:
        return ImageSource(config, encoder, dtype, device)
    return ShapesSource(config, encoder, features, progress, dtype)


def _recipe_from_config(config: RunConfig, cached: dict) -> dict:
    """The recipe this run would make, from the config alone (no LLM or VAE is loaded).

    The VAE's factors and the LLM's depth are read from the cache; everything the config names is compared.
    """
    text = config.text_encoder
    wanted = {
        **cached,
        "text_model": text.model,
        "text_layers": resolve_layers(text.layers, cached["text_model_layers"]),
        "max_length": text.max_length,
        "template": text.template,
        "resolution": config.dataset.resolution,
    }
    kind = text.feature_kind
    if kind == "hidden_states":  # what a cache without these keys holds
        for key in ("text_features", "text_feature_dim", "text_kv_heads"):
            wanted.pop(key, None)
    else:
        wanted["text_features"] = kind  # (the widths are the LLM's, as the cache recorded them)
    vae = config.dataset.vae
    if vae is None:
        wanted["vae"] = None
    elif cached["vae"] is None or cached["vae"]["path"] != str(vae):
        wanted["vae"] = {**(cached["vae"] or {}), "path": str(vae)}
    return wanted
