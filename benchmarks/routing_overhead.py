"""What semantic routing costs at the demo size: S2 (depth) against B1 (single layer).

Prints one `name value` line per figure, all measured in this one run with the same DiT, data and
steps; B1 and S2 alternate so that machine noise hits both alike, and the median is kept.

    sample_ratio_s2_over_b1   per-image sampling time S2 / B1 (target <= 1.02)
    train_ratio_s2_over_b1    training step time S2 / B1 (target <= 1.10)
    train_images_per_s        training throughput of the demo config (S2)

--profile also prints where the time of one S2 training step goes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from semroute.cli import DEMO_CONFIG, packaged_config
from semroute.config import load_config
from semroute.data.shapes import ShapesDataset, ShapesTask
from semroute.data.sources import ShapesSource
from semroute.dit import SemanticRoutingDiT
from semroute.flow import RectifiedFlow
from semroute.pipeline import SemanticRoutingPipeline
from semroute.text_encoder import TextEncoder
from semroute.train import build_optimizer, prompt_table, train_step, warmup_schedule


def make_trainer(config, strategy, encoder, source):
    kwargs = {**config.model_kwargs(), "strategy": strategy}
    torch.manual_seed(0)
    model = SemanticRoutingDiT(**kwargs, text_dim=encoder.hidden_size, num_text_layers=encoder.num_layers)
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(config.train.warmup_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=config.train.ema_decay, foreach=True)
    flow = RectifiedFlow(caption_dropout=config.train.caption_dropout)
    generator = torch.Generator().manual_seed(0)

    def step(x0, ids):
        return train_step(accelerator, model, optimizer, scheduler, ema, flow, source, (x0, ids), generator, 1.0)

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=12, help="timed training steps per strategy per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating B1/S2 rounds")
    parser.add_argument("--sample-images", type=int, default=64, help="images per timed sampling call")
    parser.add_argument("--profile", action="store_true", help="print the op breakdown of an S2 training step")
    args = parser.parse_args()

    config = load_config(packaged_config(DEMO_CONFIG))
    encoder = TextEncoder(config.text_encoder)
    dataset = ShapesDataset(ShapesTask(config.data), seed=0)
    features = prompt_table(encoder, dataset.captions, precision.dtype, progress=False)
    null_id = len(dataset.captions)
    batch = config.train.batch_size
    batches = [
        (torch.stack([dataset[i][0] for i in range(k * batch, (k + 1) * batch)]),
         torch.tensor([dataset[i][1] for i in range(k * batch, (k + 1) * batch)]))
        for k in range(4)
    ]
    source = ShapesSource(config, encoder, features, progress=False)
    trainers = {s: make_trainer(config, s, encoder, source) for s in ("single", "depth")}
    train_times = {s: [] for s in trainers}
    for s, (_, step) in trainers.items():  # warm-up
        for x0, ids in batches[:2]:
            step(x0, ids)
    for _ in range(args.rounds):
        for s, (_, step) in trainers.items():
            start = time.perf_counter()
            for i in range(args.train_steps):
                step(*batches[i % len(batches)])
            train_times[s].append((time.perf_counter() - start) / args.train_steps)

    sc = config.sample
    prompts = [dataset.captions[i % null_id] for i in range(args.sample_images)]
    pipelines = {s: SemanticRoutingPipeline.from_parts(model.eval(), encoder) for s, (model, _) in trainers.items()}
    prompt_features = pipelines["single"].encode(prompts)  # the LLM is the same for both; time the DiT side
    sample_times = {s: [] for s in pipelines}
    for s, pipe in pipelines.items():
        pipe.generate(prompts[:8], 2, sc.guidance_scale, features=pipelines["single"].encode(prompts[:8]))
    for _ in range(args.rounds):
        for s, pipe in pipelines.items():
            start = time.perf_counter()
            pipe.generate(prompts, sc.steps, sc.guidance_scale, sc.shift, features=prompt_features)
            sample_times[s].append((time.perf_counter() - start) / len(prompts))

    train_b1, train_s2 = (statistics.median(train_times[s]) for s in ("single", "depth"))
    sample_b1, sample_s2 = (statistics.median(sample_times[s]) for s in ("single", "depth"))
    print(f"sample_ratio_s2_over_b1 {sample_s2 / sample_b1:.4f}")
    print(f"train_ratio_s2_over_b1 {train_s2 / train_b1:.4f}")
    print(f"train_images_per_s {batch / train_s2:.1f}")
    print(f"sample_images_per_s_s2 {1 / sample_s2:.1f}")

    if args.profile:
        from torch.profiler import profile

        _, step = trainers["depth"]
        trainers["depth"][0].train()
        with profile() as prof:
            for i in range(3):
                step(*batches[i])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
