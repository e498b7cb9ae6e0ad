"""What a trajectory-aware gate costs: S1 with an estimated noise level against S1 reading the nominal t.

Both DiTs are the t-free CPU preset (cpu-small-tfree: the paper's setting, no timestep embedding); they
alternate in every round, and each ratio is the median of the per-round ratios [lowest, highest]:

    train_ratio_estimated_over_nominal    training step time (target < 1.02: the head is under 2% of a step)
    sample_ratio_estimated_over_nominal   per-image sampling time with CFG (target < 1.02)
    noise_head_share_of_forward           the head's forward alone over the whole DiT forward

--precision picks the precision (default: what auto picks on this machine).
"""

from __future__ import annotations

import statistics
import time

import torch

from common import DemoSetup, machine_line, pair_parser, ratio_line, time_pair
from semroute.runtime import resolve_precision

TFREE = {"timestep_conditioning": "none"}


def main() -> None:
    args = pair_parser(__doc__, "alternating nominal/estimated rounds").parse_args()

    setup = DemoSetup()
    precision = resolve_precision(args.precision, "cpu")
    print(machine_line())
    print(f"precision {precision.name}   ({precision.reason})")
    trainers = {
        signal: setup.trainer("time", precision, **TFREE, gate_signal=signal)
        for signal in ("nominal", "estimated")
    }
    train, sample = time_pair(setup, trainers, precision.name, args)
    print(ratio_line("train_ratio_estimated_over_nominal", train["estimated"], train["nominal"]))
    print(ratio_line("sample_ratio_estimated_over_nominal", sample["estimated"], sample["nominal"]))

    model = trainers["estimated"][0].eval()
    x = torch.randn(2 * args.sample_images, 3, 16, 16)
    text, mask = setup.features.select(torch.arange(2 * args.sample_images) % len(setup.dataset.captions))
    t = torch.rand(len(x))
    head, whole = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=precision.dtype, enabled=precision.name == "bf16"):
        for _ in range(args.rounds):
            start = time.perf_counter()
            model.noise_head(x)
            head.append(time.perf_counter() - start)
            start = time.perf_counter()
            model(x, t, text, mask, text_normalized=True)
            whole.append(time.perf_counter() - start)
    print(f"noise_head_share_of_forward {statistics.median(head) / statistics.median(whole):.4f}")


if __name__ == "__main__":
    main()
