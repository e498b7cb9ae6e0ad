"""ShapesBench: fixed prompts in GenEval-like categories, judged exactly by the shapes scorer.

The prompts are the shapes task's held-out split (`data.shapes.held_out_scenes`). An image is
correct only if everything its prompt says holds (counts, colours, shapes and, for `position`, the
relation) and every object in it is a clean shape. `fidelity` ignores the prompt: the share of all
generated blobs, specks included, that are pixel-clean shapes in a palette colour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..data.shapes import Scene, ShapesConfig, caption, held_out_scenes
from .sampling import sample_batches
from .scoring import fidelity_counts, score

if TYPE_CHECKING:
    from ..pipeline import SemanticRoutingPipeline

# 2: an image with any malformed object (a blob of >= 3 px that is not a clean shape) fails every check.
BENCH_VERSION = "shapesbench-2"
CATEGORIES = ("counting", "colour", "two_objects", "position")


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt and the skill it tests."""

    category: str
    scene: Scene

    @property
    def text(self) -> str:
        return caption(self.scene)


def bench_prompts(config: ShapesConfig) -> list[BenchPrompt]:
    """The fixed prompt set for a shapes vocabulary (the same config always gives the same list)."""
    return [BenchPrompt(category, scene) for category, scene in held_out_scenes(config)]


def summarize(per_prompt: list[dict], clean: int, blobs: int) -> dict:
    """Per-category accuracy, their mean (GenEval-style overall) and fidelity."""
    categories = {}
    for category in CATEGORIES:
        results = [ok for p in per_prompt if p["category"] == category for ok in p["correct"]]
        if results:
            categories[category] = sum(results) / len(results)
    return {
        "categories": categories,
        "overall": sum(categories.values()) / len(categories),
        "fidelity": clean / blobs if blobs else 0.0,
    }


def run_bench(
    pipeline: SemanticRoutingPipeline,
    prompts: list[BenchPrompt],
    images_per_prompt: int = 4,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
) -> dict:
    """Sample every prompt `images_per_prompt` times (image k of prompt i from seed + 1000 i + k) and score.

    steps / guidance_scale / shift: None takes the pipeline's own (its run's sample settings).
    """
    correct: list[list[bool]] = [[] for _ in prompts]
    clean = blobs = 0
    sampling_s = scoring_s = 0.0
    texts = [p.text for p in prompts]
    t0 = time.perf_counter()
    for jobs, images in sample_batches(
        pipeline,
        texts,
        images_per_prompt,
        steps,
        guidance_scale,
        shift,
        seed,
        batch_size,
        progress,
        desc=f"ShapesBench ({len(prompts) * images_per_prompt} images)",
    ):
        t1 = time.perf_counter()
        for (i, _), image in zip(jobs, images, strict=True):
            correct[i].append(score(image, prompts[i].scene)["exact"])
            c, b = fidelity_counts(image)
            clean, blobs = clean + c, blobs + b
        t0, sampling_s, scoring_s = (
            time.perf_counter(),
            sampling_s + t1 - t0,
            scoring_s + time.perf_counter() - t1,
        )
    per_prompt = [
        {"category": p.category, "prompt": p.text, "correct": ok}
        for p, ok in zip(prompts, correct, strict=True)
    ]
    settings = pipeline.sampling(steps, guidance_scale, shift)
    return {
        "version": BENCH_VERSION,
        **summarize(per_prompt, clean, blobs),
        "images_per_prompt": images_per_prompt,
        "sampling": {
            "scheduler": settings.scheduler,
            "steps": settings.steps,
            "guidance_scale": settings.guidance_scale,
            "shift": settings.shift,
            "gate_shift": settings.gate_shift,
            "seed": seed,
        },
        "timing": {
            "sampling_s": sampling_s,
            "scoring_s": scoring_s,
            "scoring_fraction": scoring_s / max(sampling_s, 1e-9),
        },
        "prompts": per_prompt,
    }
