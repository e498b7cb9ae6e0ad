"""Many prompts, several images each, in fixed batches: the one batched sampler of the benches and the demo.

Image k of prompt i always comes from noise seed `seed + 1000 i + k`, whatever the batch size, the
other prompts in its batch, the number of processes, or what a resumed run already wrote.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

Job = tuple[int, int]  # (prompt index i, image index k)


def image_seed(seed: int, prompt: int, k: int) -> int:
    return seed + 1000 * prompt + k


def batches(num_prompts: int, images_per_prompt: int, batch_size: int) -> list[list[Job]]:
    """Every (prompt, image) job, prompt by prompt, cut into consecutive batches of `batch_size`."""
    jobs = [(i, k) for i in range(num_prompts) for k in range(images_per_prompt)]
    return [jobs[start : start + batch_size] for start in range(0, len(jobs), batch_size)]


def sample_batches(
    pipeline,
    prompts: list[str],
    images_per_prompt: int,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
    desc: str = "sampling",
    only: list[int] | None = None,
) -> Iterator[tuple[list[Job], torch.Tensor]]:
    """Yield (jobs, images (B, C, H, W) in [0, 1]) batch by batch, with a bar over denoising steps.

    steps / guidance_scale / shift: None takes the pipeline's own. only: the indices of the batches to
    sample (the others are skipped), for sharing batches across processes or resuming.
    """
    todo = batches(len(prompts), images_per_prompt, batch_size)
    chosen = range(len(todo)) if only is None else only
    settings = pipeline.sampling(steps, guidance_scale, shift)
    total = len(chosen) * settings.scheduler_calls()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
        for index in chosen:
            jobs = todo[index]
            images = pipeline.generate([prompts[i] for i, _ in jobs], steps, guidance_scale, shift,
                                       seed=[image_seed(seed, i, k) for i, k in jobs], on_step=lambda: bar.update(1))
            yield jobs, images


def sample_all(pipeline, prompts: list[str], images_per_prompt: int, **kwargs) -> torch.Tensor:
    """`sample_batches` gathered: images grouped by prompt, (len(prompts) * images_per_prompt, C, H, W)."""
    return torch.cat([images for _, images in sample_batches(pipeline, prompts, images_per_prompt, **kwargs)])
