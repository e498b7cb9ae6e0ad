"""Counting / colour / shape accuracy of a pipeline on shapes prompts, judged by the exact scorer."""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .data.shapes import Scene, caption, score
from .pipeline import SemanticRoutingPipeline


def sample_scenes(
    pipeline: SemanticRoutingPipeline,
    scenes: list[Scene],
    images_per_prompt: int,
    num_steps: int,
    guidance_scale: float,
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
) -> torch.Tensor:
    """images_per_prompt images of each scene, grouped by scene: (len(scenes) * k, C, H, W) in [0, 1]."""
    prompts = [caption(s) for s in scenes for _ in range(images_per_prompt)]
    starts = range(0, len(prompts), batch_size)
    images = []
    with tqdm(total=len(starts) * num_steps, desc=f"sampling {len(prompts)} images", unit="step", disable=not progress) as bar:
        for start in starts:
            chunk = prompts[start : start + batch_size]
            images.append(pipeline.generate(chunk, num_steps, guidance_scale, shift, seed=seed + start,
                                            on_step=lambda: bar.update(1)))
    return torch.cat(images)


def accuracy(images: torch.Tensor, scenes: list[Scene], images_per_prompt: int) -> dict:
    """Share of images whose count / colour / shape / everything is right, overall and per prompted count."""
    totals: dict[str, float] = defaultdict(float)
    per_count: dict[int, list[bool]] = defaultdict(list)
    for i, image in enumerate(images):
        scene = scenes[i // images_per_prompt]
        result = score(image, scene)
        for key, ok in result.items():
            totals[key] += ok
        per_count[scene.total].append(result["count"])
    n = len(images)
    return {
        "images": n,
        **{f"{key}_accuracy": value / n for key, value in totals.items()},
        "count_accuracy_by_n": {str(k): sum(v) / len(v) for k, v in sorted(per_count.items())},
    }
