"""Many prompts, several images each, in fixed batches: the one batched sampler of the benches and the demo.

Image k of prompt i always comes from noise seed `seed + 1000 i + k`, whatever the batch size, the
other prompts in its batch, the number of processes, or what a resumed run already wrote.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..speed import StepCompiler

if TYPE_CHECKING:
    from ..pipeline import SemanticRoutingPipeline

Job = tuple[int, int]  # (prompt index i, image index k)


def image_seed(seed: int, prompt: int, k: int) -> int:
    return seed + 1000 * prompt + k


def batches(num_prompts: int, images_per_prompt: int, batch_size: int) -> list[list[Job]]:
    """Every (prompt, image) job, prompt by prompt, cut into consecutive batches of `batch_size`."""
    jobs = [(i, k) for i in range(num_prompts) for k in range(images_per_prompt)]
    return [jobs[start : start + batch_size] for start in range(0, len(jobs), batch_size)]


def sample_batches(
    pipeline: SemanticRoutingPipeline,
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
    `pipeline.compile` (auto | on | off, default auto): whether the DiT blocks may run compiled where this
    job's own timed steps show that it pays (`speed.StepCompiler`); the pipeline is handed back eager.
    """
    todo = batches(len(prompts), images_per_prompt, batch_size)
    chosen = list(range(len(todo)) if only is None else only)
    settings = pipeline.sampling(steps, guidance_scale, shift)
    calls = settings.scheduler_calls()
    full = max((len(todo[i]) for i in chosen), default=0)
    # Compiled DiT blocks where this job's own timed steps show they pay (speed.StepCompiler); full batches
    # only.
    model = getattr(pipeline, "transformer", None)
    compilable = model is not None and hasattr(model, "blocks")  # any pipeline with `generate` may come here
    compiler = StepCompiler(
        model if model is not None and compilable else torch.nn.Module(),
        getattr(pipeline, "compile", "auto") if compilable else "off",
        getattr(model, "device", torch.device("cpu")),
        work="sampling",
        cost_key="sampling_compile_seconds",
    )
    left = sum(calls for i in chosen if len(todo[i]) == full)
    clock = [time.perf_counter()]

    with tqdm(total=len(chosen) * calls, desc=desc, unit="step", disable=not progress) as bar:

        def step_done(timed: bool) -> None:
            nonlocal left
            bar.update(1)
            now = time.perf_counter()
            if timed:
                left -= 1
                compiler.observe(now - clock[0], left)
            clock[0] = now

        try:
            for index in chosen:
                jobs = todo[index]
                timed = len(jobs) == full
                compiler.resume() if timed else compiler.pause()
                clock[0] = time.perf_counter()
                done_before, left_before = bar.n, left
                generate = functools.partial(
                    pipeline.generate,
                    [prompts[i] for i, _ in jobs],
                    steps,
                    guidance_scale,
                    shift,
                    seed=[image_seed(seed, i, k) for i, k in jobs],
                    on_step=functools.partial(step_done, timed),
                )
                try:
                    images = generate()
                except Exception as err:  # compiled blocks that raise (inductor): this batch again, eager
                    if not (timed and compiler.used):
                        raise
                    compiler.failed(err)
                    bar.n, left = done_before, left_before
                    bar.refresh()
                    images = generate()
                yield jobs, images
        finally:
            compiler.pause()  # the pipeline is handed back eager


def sample_all(
    pipeline: SemanticRoutingPipeline, prompts: list[str], images_per_prompt: int, **kwargs: Any
) -> torch.Tensor:
    """`sample_batches` gathered: images grouped by prompt, (len(prompts) * images_per_prompt, C, H, W)."""
    return torch.cat([images for _, images in sample_batches(pipeline, prompts, images_per_prompt, **kwargs)])
