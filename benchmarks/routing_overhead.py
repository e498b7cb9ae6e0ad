"""What semantic routing costs at the demo size: S2 (depth) against B1 (single layer).

Prints one `name value [lowest, highest] over N rounds` line per ratio, all measured in this one run
with the same DiT, data, precision and steps; B1 and S2 alternate in every round, so that machine
noise hits both alike, and the median of the per-round ratios is kept:

    sample_ratio_s2_over_b1   per-image sampling time S2 / B1 (target <= 1.02)
    train_ratio_s2_over_b1    training step time S2 / B1 (target <= 1.10)
    train_images_per_s        training throughput of the demo config (S2), median round
    sample_images_per_s_s2    sampling throughput (25 Euler steps with CFG)

--precision picks the precision (default: what auto picks on this machine); --profile also prints
where the time of one S2 training step goes.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import DemoSetup, interleaved, machine_line, ratio_line
from semroute.runtime import resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=4, help="timed training steps per strategy per round")
    parser.add_argument("--rounds", type=int, default=9, help="alternating B1/S2 rounds")
    parser.add_argument("--sample-images", type=int, default=32, help="images per timed sampling call")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--profile", action="store_true", help="print the op breakdown of an S2 training step")
    args = parser.parse_args()

    setup = DemoSetup()
    precision = resolve_precision(args.precision, "cpu")
    print(machine_line())
    print(f"precision {precision.name}   ({precision.reason})")
    trainers = {s: setup.trainer(s, precision) for s in ("single", "depth")}
    train = interleaved({s: (lambda step=step: [step(i) for i in range(args.train_steps)]) for s, (_, step) in trainers.items()},
                        args.rounds)
    samplers = {s: setup.sampler(model, precision.name, args.sample_images) for s, (model, _) in trainers.items()}
    sample = interleaved(samplers, args.rounds)

    print(ratio_line("sample_ratio_s2_over_b1", sample["depth"], sample["single"]))
    print(ratio_line("train_ratio_s2_over_b1", train["depth"], train["single"]))
    batch = setup.config.train.batch_size * args.train_steps
    print(f"train_images_per_s {batch / statistics.median(train['depth']):.1f}")
    print(f"sample_images_per_s_s2 {args.sample_images / statistics.median(sample['depth']):.2f}")

    if args.profile:
        from torch.profiler import profile

        model, step = trainers["depth"]
        model.train()
        with profile() as prof:
            for i in range(3):
                step(i)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
