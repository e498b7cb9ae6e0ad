"""Sample grids of a run in progress: the source's preview
prompts, drawn with the EMA weights at a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from .features import PromptFeatures
from .flow import SampleConfig
from .pipeline import SemanticRoutingPipeline
from .plots import save_sample_grid
from .sources import Preview

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from .dit import SemanticRoutingDiT
    from .text_encoder import EncoderInfo, TextEncoder


def write_sample_grid(
    model: SemanticRoutingDiT,
    ema: EMAModel | None,
    encoder: EncoderInfo,
    preview: Preview,
    sample: SampleConfig,
    precision: str,
    path: Path,
    title: str,
) -> None:
    """`sample.images_per_prompt` images of every preview prompt, from its stored features (no LLM call).

    ema: sample with its weights (restored afterwards), or None to sample `model`'s own."""
    k = sample.images_per_prompt
    n = len(preview.captions)
    # Each caption k times, then the null prompt
    ids = torch.cat([torch.arange(n).repeat_interleave(k), torch.tensor([n])])
    features = PromptFeatures(preview.features.hidden[ids].float(), preview.features.mask[ids])
    prompts = [c for c in preview.captions for _ in range(k)]
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    try:
        # The grid samples from the preview's stored features: the encoder is only described, never run.
        pipe = SemanticRoutingPipeline.from_parts(
            model, cast("TextEncoder", encoder), sample=sample, precision=precision
        )
        images = pipe.generate(prompts, seed=0, features=features)
    finally:
        if ema is not None:
            ema.restore(model.parameters())
        model.train()
    save_sample_grid(images, preview.captions, k, path, title=title)
