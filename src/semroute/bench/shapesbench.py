"""ShapesBench: fixed prompts in GenEval-like categories, judged exactly by the shapes scorer.

An image is correct only if everything its prompt says holds (counts, colours, shapes and, for
`position`, the relation). `fidelity` ignores the prompt: the share of all generated blobs,
specks included, that are pixel-clean shapes in a palette colour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from ..data.shapes import Group, Scene, ShapesConfig, ShapesTask, caption, fidelity_counts, score

# 2: an image with any malformed object (a blob of >= 3 px that is not a clean shape) fails every check.
BENCH_VERSION = "shapesbench-2"
CATEGORIES = ("counting", "colour", "two_objects", "position")
_SEED = 20260203  # part of the version: changing it changes the prompt set
PROMPTS_PER_CATEGORY = 12


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt and the skill it tests."""

    category: str
    scene: Scene

    @property
    def text(self) -> str:
        return caption(self.scene)


def bench_prompts(config: ShapesConfig) -> list[BenchPrompt]:
    """The fixed prompt set for a shapes vocabulary (the same config always gives the same list).

    counting: every count with every shape, colour drawn; colour (single objects that are not also
    counting prompts), two_objects and position: drawn without replacement.
    """
    task = ShapesTask(replace(config, exclude_bench_prompts=False))
    c = task.config
    rng = np.random.default_rng(_SEED)
    prompts = [
        BenchPrompt("counting", Scene((Group(n, c.colours[rng.integers(len(c.colours))], shape),)))
        for n in c.counts
        for shape in c.shapes
    ]
    taken = {p.scene for p in prompts}
    singles = [s for s in task.single_scenes if s.total == 1 and s not in taken]  # no prompt in two categories
    for category, pool in (("colour", singles), ("two_objects", task.two_object_scenes), ("position", task.position_scenes)):
        picks = rng.choice(len(pool), size=min(PROMPTS_PER_CATEGORY, len(pool)), replace=False)
        prompts += [BenchPrompt(category, pool[i]) for i in sorted(picks)]
    return prompts


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
    pipeline,
    prompts: list[BenchPrompt],
    images_per_prompt: int = 4,
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
) -> dict:
    """Sample every prompt `images_per_prompt` times (image k of prompt i always from seed + 1000 i + k) and score."""
    jobs = [(i, k) for i in range(len(prompts)) for k in range(images_per_prompt)]
    correct: list[list[bool]] = [[] for _ in prompts]
    clean = blobs = 0
    sampling_s = scoring_s = 0.0
    starts = range(0, len(jobs), batch_size)
    bar = tqdm(total=len(starts) * num_steps, desc=f"ShapesBench ({len(jobs)} images)", unit="step", disable=not progress)
    for start in starts:
        chunk = jobs[start : start + batch_size]
        t0 = time.perf_counter()
        images = pipeline.generate(
            [prompts[i].text for i, _ in chunk], num_steps, guidance_scale, shift,
            seed=[seed + 1000 * i + k for i, k in chunk], on_step=lambda: bar.update(1),
        )
        t1 = time.perf_counter()
        for (i, _), image in zip(chunk, images):
            correct[i].append(score(image, prompts[i].scene)["exact"])
            c, b = fidelity_counts(image)
            clean, blobs = clean + c, blobs + b
        sampling_s += t1 - t0
        scoring_s += time.perf_counter() - t1
    bar.close()
    per_prompt = [
        {"category": p.category, "prompt": p.text, "correct": ok} for p, ok in zip(prompts, correct)
    ]
    return {
        "version": BENCH_VERSION,
        **summarize(per_prompt, clean, blobs),
        "images_per_prompt": images_per_prompt,
        "sampling": {"steps": num_steps, "guidance_scale": guidance_scale, "shift": shift, "seed": seed},
        "timing": {"sampling_s": sampling_s, "scoring_s": scoring_s, "scoring_fraction": scoring_s / max(sampling_s, 1e-9)},
        "prompts": per_prompt,
    }
