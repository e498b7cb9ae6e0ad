"""Where training batches come from: the shapes task, images + captions, or a precomputed cache.

Every source gives the trainer the same thing: clean DiT inputs x0 (B, C, H, W) and the LN'd LLM
layers (L, B, S, C) + mask (B, S), with a given subset of captions replaced by the null prompt.
"""

from __future__ import annotations

import logging

import torch

from ..fusion import LayerFusion
from ..latent import check_vae_matches, encode_latents, load_vae
from ..features import NULL_PROMPT, PromptFeatures, prompt_table
from .cache import CachedDataset, recipe_differences
from .images import ImageCaptionDataset, collate_skipping
from .shapes import ShapesDataset, ShapesTask

logger = logging.getLogger(__name__)


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation per epoch from (seed, epoch): the data order is a function of the step, for exact resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class ShapesSource:
    """Endless deterministic shapes scenes; captions are ids into a feature table computed once."""

    def __init__(self, config, encoder, features: PromptFeatures | None, progress: bool, dtype: torch.dtype = torch.float32):
        t = config.train
        self.dataset = ShapesDataset(ShapesTask(config.data), seed=t.seed)
        if features is None:
            features = prompt_table(encoder, self.dataset.captions, dtype, progress)
        elif features.hidden.shape[0] != len(self.dataset.captions) + 1:
            raise ValueError(
                f"features hold {features.hidden.shape[0]} prompts; this data config has {len(self.dataset.captions)} + the null prompt"
            )
        self.features = PromptFeatures(features.hidden.to(dtype), features.mask)
        self.encoder = encoder
        self.null_id = len(self.dataset.captions)
        self.sampler = None  # items are drawn from rng(seed, index): the order is already fixed

    def loader(self, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def condition(self, batch, drop: torch.Tensor, device):
        x0, ids = batch
        ids = torch.where(drop.to(ids.device), torch.full_like(ids, self.null_id), ids)
        text, mask = self.features.select(ids.cpu())
        return x0, text.to(device), mask.to(device)


class ImageSource:
    """Images + captions through the VAE (or pixels) and the LLM, every step."""

    def __init__(self, config, encoder, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        d = config.dataset
        self.dataset = ImageCaptionDataset(d, seed=config.train.seed)
        self.encoder = encoder
        self.vae = load_vae(d.vae).to(device) if d.vae else None
        model = config.model.settings()
        if self.vae is not None:
            check_vae_matches(self.vae, model["in_channels"], model["sample_size"], d.resolution)
        self.sampler = EpochShuffle(len(self.dataset), config.train.seed)
        self.dtype = dtype

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = self.dataset.epoch = epoch

    def loader(self, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
        _check_size(len(self.dataset), batch_size)
        return torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                           num_workers=num_workers, collate_fn=collate_skipping)

    def condition(self, batch, drop: torch.Tensor, device):
        pixels, captions = batch
        captions = [NULL_PROMPT if d else c for c, d in zip(captions, drop.tolist())]
        x0 = encode_latents(self.vae, pixels) if self.vae is not None else pixels
        hidden, mask = self.encoder(captions)
        return x0.to(device), LayerFusion.normalize(hidden).to(device, self.dtype), mask.to(device)


class CacheSource:
    """Rows of a `semroute precompute` cache: a step never runs the VAE or the LLM."""

    def __init__(self, config, encoder_recipe: dict | None = None, dataset: CachedDataset | None = None,
                 dtype: torch.dtype = torch.float32):
        d = config.dataset
        self.dataset = dataset or CachedDataset(d.cache)
        recipe = self.dataset.meta["recipe"]
        if encoder_recipe is not None:
            differences = recipe_differences(recipe, encoder_recipe)
            if differences:
                raise ValueError(f"the cache in {d.cache} was made another way than this run: {'; '.join(differences)}; "
                                 f"precompute a new cache for this config")
        model = config.model.settings()
        channels = recipe["vae"]["latent_channels"] if recipe["vae"] else 3
        if channels != model["in_channels"]:
            raise ValueError(f"the cache holds {channels}-channel inputs but model.in_channels is {model['in_channels']}")
        self.null_text, self.null_mask = self.dataset.null_features()
        self.dtype = dtype  # the training precision's, whatever the cache stores: no bf16 math in an fp32 run
        self.sampler = EpochShuffle(len(self.dataset), config.train.seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def loader(self, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
        _check_size(len(self.dataset), batch_size)
        return torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                           num_workers=num_workers)

    def condition(self, batch, drop: torch.Tensor, device):
        latents, text, mask = batch  # (B, C, h, w), (B, L, S, C), (B, S)
        drop = drop.to(text.device)
        text = torch.where(drop[:, None, None, None], self.null_text.to(text.dtype), text)
        mask = torch.where(drop[:, None], self.null_mask, mask)
        return latents.float().to(device), text.transpose(0, 1).to(device, self.dtype), mask.to(device)


def _check_size(n: int, batch_size: int) -> None:
    # Full batches only (the last partial batch of an epoch is dropped): every step sees batch_size images.
    if n < batch_size:
        raise ValueError(f"the dataset has {n} usable rows, fewer than train.batch_size {batch_size}; lower the batch size")


def build_source(config, encoder_factory, features: PromptFeatures | None = None, progress: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """The batch source the config asks for. `encoder_factory()` loads the LLM (not called for a cache).

    dtype: what the LN'd text features are handed to the DiT in (the training precision's dtype).
    device: where a VAE runs (the LLM is placed by `encoder_factory`).
    """
    d = config.dataset
    if d.cache is not None:
        dataset = CachedDataset(d.cache)
        return CacheSource(config, _recipe_from_config(config, dataset.meta["recipe"]), dataset, dtype)
    if d.active:
        return ImageSource(config, encoder_factory(), dtype, device)
    return ShapesSource(config, encoder_factory(), features, progress, dtype)


def _recipe_from_config(config, cached: dict) -> dict:
    """The recipe this run would make, from the config alone (no LLM or VAE is loaded).

    The VAE's factors and the LLM's depth are read from the cache; everything the config names is compared.
    """
    t = config.text_encoder
    depth = cached["text_model_layers"]
    layers = [x + depth + 1 if x < 0 else x for x in t.layers] if t.layers else list(range(1, depth + 1))
    wanted = {**cached, "text_model": t.model, "text_layers": layers, "max_length": t.max_length,
              "template": t.template, "resolution": config.dataset.resolution}
    vae = config.dataset.vae
    if vae is None:
        wanted["vae"] = None
    elif cached["vae"] is None or cached["vae"]["path"] != str(vae):
        wanted["vae"] = {**(cached["vae"] or {}), "path": str(vae)}
    return wanted


class CachedEncoderInfo:
    """What training needs to know about the LLM of a cache, without loading it."""

    def __init__(self, recipe: dict):
        from ..text_encoder import TextEncoderConfig

        self.config = TextEncoderConfig(model=recipe["text_model"], layers=list(recipe["configured_layers"]),
                                        max_length=recipe["max_length"], template=recipe["template"])
        self.layers = list(recipe["text_layers"])
        self.num_layers = len(self.layers)
        self.hidden_size = recipe["text_hidden_size"]


