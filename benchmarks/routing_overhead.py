"""What semantic routing costs at the demo size: S2 (depth) against B1 (single layer).

Prints one `name value [lowest, highest] over N rounds` line per ratio, all measured in this one run
with the same DiT, data, precision and steps; B1 and S2 alternate in every round, so that machine
noise hits both alike, and the median of the per-round ratios is kept:

    sample_ratio_s2_over_b1   per-image sampling time S2 / B1 (target <= 1.02)
    train_ratio_s2_over_b1    training step time S2 / B1 (target <= 1.10)
    train_images_per_s        training throughput of the demo config (S2), median round
    sample_images_per_s_s2    sampling throughput (25 Euler steps with CFG)

--strategies adds rows, each timed against B1 in the same rounds (`--strategies
single,depth,concat,layer_attention,hard` also times the schemes of released models; deep fusion reads
keys/values the demo's feature table does not hold). --precision picks the precision (default: what auto
picks on this machine); --profile also prints where the time of one S2 training step goes.
"""

from __future__ import annotations

import statistics

import torch

from common import DemoSetup, machine_line, pair_parser, ratio_line, time_pair
from semroute.fusion import STRATEGY_TABLE
from semroute.runtime import resolve_precision


def main() -> None:
    parser = pair_parser(__doc__, "alternating B1/S2 rounds")
    parser.add_argument(
        "--profile", action="store_true", help="print the op breakdown of an S2 training step"
    )
    parser.add_argument(
        "--strategies", default="single,depth", help="comma-separated strategies (single and depth always)"
    )
    args = parser.parse_args()

    setup = DemoSetup()
    precision = resolve_precision(args.precision, "cpu")
    print(machine_line())
    print(f"precision {precision.name}   ({precision.reason})")
    names = list(
        dict.fromkeys(["single", "depth", *(s.strip() for s in args.strategies.split(",") if s.strip())])
    )
    trainers = {s: setup.trainer(s, precision) for s in names}
    train, sample = time_pair(setup, trainers, precision.name, args)

    for name in names[1:]:
        sid = STRATEGY_TABLE[name].paper_id
        print(ratio_line(f"sample_ratio_{sid}_over_b1", sample[name], sample["single"]))
        print(ratio_line(f"train_ratio_{sid}_over_b1", train[name], train["single"]))
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
