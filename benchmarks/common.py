"""Shared parts of the timing benchmarks: the demo's model and data, trainers and samplers, interleaved
rounds.

Every figure is a ratio of two things timed alternately in the same run, so that a busy machine slows
both alike; each ratio is printed as the median over rounds with the lowest and highest round beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel

from semroute.base import DEMO_CONFIG, packaged_config
from semroute.config import load_config
from semroute.data.shapes import ShapesDataset, ShapesTask
from semroute.dit import SemanticRoutingDiT
from semroute.features import dit_text_args, prompt_table
from semroute.flow import RectifiedFlow
from semroute.pipeline import SemanticRoutingPipeline
from semroute.runtime import Precision, cpu_capability
from semroute.sources import ShapesSource
from semroute.step import StepParts, build_optimizer, train_step, warmup_schedule
from semroute.text_encoder import TextEncoder


class DemoSetup:
    """The demo config, SmolLM2 features of its captions, and a few fixed training batches."""

    def __init__(self, batches: int = 4):
        self.config = load_config(packaged_config(DEMO_CONFIG))
        self.encoder = TextEncoder(self.config.text_encoder)
        self.dataset = ShapesDataset(ShapesTask(self.config.data), seed=0)
        self.features = prompt_table(self.encoder, self.dataset.captions, torch.float32, progress=False)
        b = self.config.train.batch_size
        self.batches = [
            (
                torch.stack([self.dataset[i][0] for i in range(k * b, (k + 1) * b)]),
                torch.tensor([self.dataset[i][1] for i in range(k * b, (k + 1) * b)]),
            )
            for k in range(batches)
        ]

    def trainer(
        self, strategy: str, precision: Precision, **model_args
    ) -> tuple[SemanticRoutingDiT, Callable[[int], None]]:
        """A model and `step(i)`, one optimizer step on batch i (mod the batches) in `precision`.

        model_args: DiT arguments over the demo config's (e.g. timestep_conditioning, gate_signal)."""
        config = self.config
        torch.manual_seed(0)
        model = SemanticRoutingDiT(
            **{**config.model.dit_kwargs(), "strategy": strategy, **model_args}, **dit_text_args(self.encoder)
        )
        AcceleratorState._reset_state()
        accelerator = Accelerator(cpu=True, mixed_precision=precision.accelerate)
        optimizer = build_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(config.train.warmup_steps))
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        ema = EMAModel(
            accelerator.unwrap_model(model).parameters(), decay=config.train.ema_decay, foreach=True
        )
        flow = RectifiedFlow(caption_dropout=config.train.caption_dropout)
        source = ShapesSource(config, self.encoder, self.features, progress=False, dtype=precision.dtype)
        generator = torch.Generator().manual_seed(0)

        parts = StepParts(
            accelerator,
            model,
            optimizer,
            scheduler,
            ema,
            flow,
            source,
            generator,
            1.0,
            config.train.noise_level_weight,
        )

        def step(i: int) -> None:
            # prepare() wrapped this model's forward in its own autocast, so trainers of several precisions
            # can alternate.
            train_step(parts, self.batches[i % len(self.batches)])

        return accelerator.unwrap_model(model), step

    def sampler(self, model: SemanticRoutingDiT, precision: str, images: int) -> Callable[[], None]:
        """`sample()`: `images` images of the demo's sampling
        recipe (Euler steps, CFG) from fixed features."""
        s = self.config.sample
        pipe = SemanticRoutingPipeline.from_parts(model.eval(), self.encoder, precision=precision)
        prompts = [self.dataset.captions[i % len(self.dataset.captions)] for i in range(images)]
        features = pipe.encode(prompts)
        return lambda: pipe.generate(prompts, s.steps, s.guidance_scale, s.shift, features=features)


def interleaved(jobs: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each job in each round; the jobs take turns within every round."""
    for _ in range(warmup):
        for job in jobs.values():
            job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_line(name: str, numerator: list[float], denominator: list[float]) -> str:
    """`name median [lowest, highest] over N rounds` of the per-round ratios."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    spread = f"[{min(ratios):.4f}, {max(ratios):.4f}]"
    return f"{name} {statistics.median(ratios):.4f}   {spread} over {len(ratios)} rounds"


def machine_line() -> str:
    threads = torch.get_num_threads()
    return f"machine cpu_capability={cpu_capability()} threads={threads} torch={torch.__version__}"


def pair_parser(doc: str, rounds_help: str) -> argparse.ArgumentParser:
    """The flags of a benchmark that times two trainers and their samplers against each other."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=4, help="timed training steps per model per round")
    parser.add_argument("--rounds", type=int, default=9, help=rounds_help)
    parser.add_argument("--sample-images", type=int, default=32, help="images per timed sampling call")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    return parser


def time_pair(
    setup: DemoSetup, trainers: dict, precision: str, args
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Training-step and sampling seconds per round of each `setup.trainer` model, the models alternating in
    every round.

    args: the parsed `pair_parser` flags."""
    train = interleaved(
        {
            s: (lambda step=step: [step(i) for i in range(args.train_steps)])
            for s, (_, step) in trainers.items()
        },
        args.rounds,
    )
    samplers = {s: setup.sampler(model, precision, args.sample_images) for s, (model, _) in trainers.items()}
    return train, interleaved(samplers, args.rounds)
