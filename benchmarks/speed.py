"""Achieved GFLOP/s of training steps and sampling runs against this machine's matmul peak, and this
checkout's speed against a baseline commit's, all measured in one run (the variants alternate in every round).

    python benchmarks/speed.py [--baseline 2d89e51] [--sizes demo,ablation] [--strategies b1,s2] [--rounds 5]

The baseline is the package as it was at --baseline (default 2d89e51, the commit before "fastest per FLOP"),
extracted with `git archive` and imported beside this checkout's under another name; both train and
sample the same model, data and features, in the same precision (--precision; auto resolves as training
would).

Sizes: `demo` is configs/demo.yaml (cpu-small, batch 32), `ablation` configs/ablation.yaml (batch 64).
For each size and strategy it prints
    train_<size>_<id>  GFLOPs per step (torch.utils.flop_counter: matmuls, convolutions and attention),
                       then img/s and GFLOP/s of the baseline, ours eager and ours compiled (torch.compile of
                       the DiT blocks, as `train.compile` does it), each as a share of the fp32 matmul peak
    ratio lines        ours / baseline throughput, median [lowest, highest] over the rounds
    sample_<size>_<id> the same for the demo's sampling recipe (25 Euler steps, CFG 3) of --sample-images
                       images, eager (as semroute samples) and compiled (to show what a compiled sampler
                       would gain, and its first-call cost)
and first the machine's fp32 and bf16 matmul peaks (best of 512-2048 square products, same threads).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from common import interleaved, machine_line, ratio_line

REPO = Path(__file__).resolve().parents[1]
IDS = {"b1": "single", "s2": "depth", "b2": "uniform", "s1": "time", "s3": "joint", "fusedit": "deep"}
CONFIGS = {"demo": "demo.yaml", "ablation": "ablation.yaml"}


def load_baseline(ref: str, into: Path):
    """The semroute package as it was at git `ref`, importable as `semroute_baseline`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "src/semroute"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    root = into / "src" / "semroute"
    spec = importlib.util.spec_from_file_location(
        "semroute_baseline", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["semroute_baseline"] = module
    spec.loader.exec_module(module)
    return "semroute_baseline"


def matmul_peak(dtype: torch.dtype) -> float:
    """Best GFLOP/s of square matrix products of 512, 1024 and 2048 in `dtype`."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        reps = max(1, int(2e9 / (2 * n**3)) if dtype == torch.float32 else 1)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


class Package:
    """One version of semroute (this checkout's or the
    baseline's) set up on the same data and text encoder."""

    def __init__(self, name: str, size: str, encoder, precision: str):
        self.name = name

        def m(sub: str):
            return importlib.import_module(f"{name}.{sub}")

        self.m = m
        # Where the step lives: semroute.step in this checkout, semroute.train in the baseline.
        self.step_module = "step" if importlib.util.find_spec(f"{name}.step") is not None else "train"
        configs = m("base") if importlib.util.find_spec(f"{name}.base") is not None else m("cli")
        self.config = m("config").load_config(configs.packaged_config(CONFIGS[size]))
        self.encoder = encoder
        data = m("data.shapes")
        self.dataset = data.ShapesDataset(data.ShapesTask(self.config.data), seed=0)
        self.precision = m("runtime").Precision(precision, precision, "benchmark")
        self.features = m("features").prompt_table(
            encoder, self.dataset.captions, self.precision.dtype, progress=False
        )
        b = self.config.train.batch_size
        self.batches = [
            (
                torch.stack([self.dataset[i][0] for i in range(k * b, (k + 1) * b)]),
                torch.tensor([self.dataset[i][1] for i in range(k * b, (k + 1) * b)]),
            )
            for k in range(4)
        ]
        if importlib.util.find_spec(f"{name}.speed") is not None:  # versions that measure their attention
            m("speed").configure(torch.device("cpu"))

    def trainer(self, strategy: str, compiled: bool = False):
        """(model, step(i)): one optimizer step on batch i, as the trainer runs it."""
        m, config = self.m, self.config
        torch.manual_seed(0)
        model = m("dit").SemanticRoutingDiT(
            **{**config.model.dit_kwargs(), "strategy": strategy}, **m("features").dit_text_args(self.encoder)
        )
        AcceleratorState._reset_state()
        accelerator = Accelerator(cpu=True, mixed_precision=self.precision.accelerate)
        home = m(self.step_module)
        optimizer = home.build_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, home.warmup_schedule(config.train.warmup_steps)
        )
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        ema = EMAModel(
            accelerator.unwrap_model(model).parameters(), decay=config.train.ema_decay, foreach=True
        )
        flow = m("flow").RectifiedFlow(caption_dropout=config.train.caption_dropout)
        sources = "sources" if importlib.util.find_spec(f"{self.name}.sources") else "data.sources"
        source = m(sources).ShapesSource(
            config, self.encoder, self.features, progress=False, dtype=self.precision.dtype
        )
        generator = torch.Generator().manual_seed(0)
        raw = accelerator.unwrap_model(model)
        if compiled:
            for block in raw.blocks:
                block.forward = torch.compile(block.forward)

        args = (accelerator, model, optimizer, scheduler, ema, flow, source)
        rest = (generator, 1.0, config.train.noise_level_weight)
        if hasattr(home, "StepParts"):  # this checkout: train_step(StepParts, batch)
            parts = home.StepParts(*args, *rest)

            def step(i: int) -> None:
                home.train_step(parts, self.batches[i % len(self.batches)])

        else:  # the baseline: train_step took each part as an argument

            def step(i: int) -> None:
                home.train_step(*args, self.batches[i % len(self.batches)], *rest)

        return raw, step

    def sampler(self, model, images: int):
        s = self.config.sample
        pipe = self.m("pipeline").SemanticRoutingPipeline.from_parts(
            model.eval(), self.encoder, precision=self.precision.name
        )
        prompts = [self.dataset.captions[i % len(self.dataset.captions)] for i in range(images)]
        features = pipe.encode(prompts)
        return lambda: pipe.generate(prompts, s.steps, s.guidance_scale, s.shift, features=features)


def show(name: str, gflop: float, images: int, seconds: list[float], peak: float) -> str:
    t = statistics.median(seconds)
    rate = gflop / t
    return f"{name} {images / t:.2f} img/s {rate:.1f} GFLOP/s ({100 * rate / peak:.0f}% of peak)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", default="2d89e51", help="git commit to compare with (default: before issue 20)"
    )
    parser.add_argument("--sizes", default="demo,ablation", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--strategies", default="b1,s2", help=f"comma-separated paper ids, of {', '.join(IDS)}"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per measurement")
    parser.add_argument(
        "--train-steps", type=int, default=3, help="timed training steps per variant per round"
    )
    parser.add_argument("--sample-images", type=int, default=8, help="images per timed sampling call")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled training variant")
    args = parser.parse_args()

    from semroute.base import packaged_config
    from semroute.config import load_config
    from semroute.runtime import resolve_precision
    from semroute.text_encoder import TextEncoder

    precision = resolve_precision(args.precision, "cpu").name
    print(machine_line())
    peak = matmul_peak(torch.float32)
    print(
        f"peak_fp32_gflops {peak:.1f}   peak_bf16_gflops {matmul_peak(torch.bfloat16):.1f}   "
        f"(best of 512-2048 square matmuls, {torch.get_num_threads()} threads)"
    )
    print(f"precision {precision}")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_baseline(args.baseline, Path(tmp))
        for size in args.sizes.split(","):
            encoder = TextEncoder(load_config(packaged_config(CONFIGS[size])).text_encoder)
            for sid in args.strategies.split(","):
                strategy = IDS[sid]
                ours, base = (
                    Package("semroute", size, encoder, precision),
                    Package(baseline, size, encoder, precision),
                )
                b = ours.config.train.batch_size
                variants = {"baseline": base.trainer(strategy), "ours": ours.trainer(strategy)}
                if not args.no_compile:
                    model, step = ours.trainer(strategy, compiled=True)
                    start = time.perf_counter()
                    step(0)
                    print(f"train_{size}_{sid}_compile_first_call_s {time.perf_counter() - start:.1f}")
                    variants["ours_compiled"] = (model, step)
                step_flops = flops(lambda: variants["ours"][1](0)) / 1e9
                jobs = {
                    k: (lambda step=step: [step(i) for i in range(args.train_steps)])
                    for k, (_, step) in variants.items()
                }
                times = interleaved(jobs, args.rounds)
                print(
                    f"train_{size}_{sid} batch {b}, {step_flops:.2f} GFLOP per step ({step_flops / b:.3f} "
                    "per image)"
                )
                for k, ts in times.items():
                    print("  " + show(k, step_flops * args.train_steps, b * args.train_steps, ts, peak))
                for k in times:
                    if k != "baseline":
                        print(
                            "  "
                            + ratio_line(
                                f"train_{size}_{sid}_speedup_{k}_over_baseline", times["baseline"], times[k]
                            )
                        )
                samplers = {
                    "baseline": base.sampler(variants["baseline"][0], args.sample_images),
                    "ours": ours.sampler(variants["ours"][0], args.sample_images),
                }
                sample_flops = flops(samplers["ours"]) / 1e9
                if "ours_compiled" in variants:  # the compiled training model, sampled: an inference compile
                    samplers["ours_compiled"] = ours.sampler(variants["ours_compiled"][0], args.sample_images)
                    start = time.perf_counter()
                    samplers["ours_compiled"]()
                    print(f"sample_{size}_{sid}_compile_first_call_s {time.perf_counter() - start:.1f}")
                times = interleaved(samplers, args.rounds)
                print(f"sample_{size}_{sid} {args.sample_images} images, {sample_flops:.2f} GFLOP per call")
                for k, ts in times.items():
                    print("  " + show(k, sample_flops, args.sample_images, ts, peak))
                for k in times:
                    if k != "baseline":
                        print(
                            "  "
                            + ratio_line(
                                f"sample_{size}_{sid}_speedup_{k}_over_baseline", times["baseline"], times[k]
                            )
                        )
                sys.stdout.flush()


if __name__ == "__main__":
    main()
