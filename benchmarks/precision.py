"""fp32 against bf16 on this machine, at the demo size: training and sampling throughput side by side.

Prints, from one run (fp32 and bf16 alternate in every round, so machine noise hits both alike):

    machine ...                      torch's CPU capability, threads
    auto_picks ...                   what --precision auto chooses here, and why
    train_images_per_s_fp32 / _bf16  median over rounds
    train_ratio_bf16_over_fp32       time of a bf16 step / an fp32 one (< 1: bf16 is faster), [lowest,
    highest] round sample_images_per_s_fp32 / _bf16 the demo's sampling recipe (25 Euler steps with CFG)
    sample_ratio_bf16_over_fp32

On a CPU without native bf16 run it as is; to see such a CPU on one that has it, cap the ISA:
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import DemoSetup, interleaved, machine_line, ratio_line
from semroute.runtime import Precision, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating fp32/bf16 rounds")
    parser.add_argument(
        "--train-steps", type=int, default=2, help="timed training steps per precision per round"
    )
    parser.add_argument("--sample-images", type=int, default=8, help="images per timed sampling call")
    args = parser.parse_args()

    setup = DemoSetup()
    auto = resolve_precision("auto", "cpu")
    print(machine_line())
    print(f"auto_picks {auto.name}   ({auto.reason})")
    precisions = {name: Precision(name, name, "benchmark") for name in ("fp32", "bf16")}
    trainers = {name: setup.trainer("depth", p) for name, p in precisions.items()}
    train = interleaved(
        {
            name: (lambda step=step: [step(i) for i in range(args.train_steps)])
            for name, (_, step) in trainers.items()
        },
        args.rounds,
    )
    batch = setup.config.train.batch_size * args.train_steps
    for name in precisions:
        print(f"train_images_per_s_{name} {batch / statistics.median(train[name]):.1f}")
    print(ratio_line("train_ratio_bf16_over_fp32", train["bf16"], train["fp32"]))

    samplers = {name: setup.sampler(model, name, args.sample_images) for name, (model, _) in trainers.items()}
    sample = interleaved(samplers, args.rounds)
    for name in precisions:
        print(f"sample_images_per_s_{name} {args.sample_images / statistics.median(sample[name]):.2f}")
    print(ratio_line("sample_ratio_bf16_over_fp32", sample["bf16"], sample["fp32"]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
