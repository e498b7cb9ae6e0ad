"""The checks of each flag's value and the option groups that several commands share."""

from __future__ import annotations

import argparse
import math

from ..base import COMPILE_CHOICES, INT_LIMIT, PRECISIONS, check_guidance, valid_text


def integer(text: str) -> int:
    """An int from a flag; integers past INT_LIMIT are typos, not values."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text[:40]!r}") from None
    if abs(value) > INT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {INT_LIMIT:,}, got {text:.40}")
    return value


def finite(text: str) -> float:
    """A finite float from a flag; inf and nan are typos, not values."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def prompt_text(text: str) -> str:
    """A prompt from the command line: valid UTF-8 (a shell can pass any bytes)."""
    try:
        return valid_text(text, "the prompt")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def port_number(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0..65535, got {value}")
    return value


def seed(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be in 0..{INT_LIMIT}, got {value}")
    return value


def positive_float(text: str) -> float:
    value = finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def guidance(text: str) -> float:
    try:
        return check_guidance(finite(text), "the scale")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def runtime_arguments(
    parser: argparse.ArgumentParser, precision_default: str | None = "auto", train: bool = False
) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("device and precision")
    group.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, mps" + ("" if train else ", or cuda:N"),
    )
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=precision_default,
        help=("default: train.mixed_precision of the config. " if precision_default is None else "")
        + "auto picks bf16 only where it is measured faster than fp32 on this machine (timed once, cached), "
        "fp16 with loss scaling on GPUs without bf16, else fp32",
    )
    return group


def guidance_list(text: str) -> list[float]:
    values = [guidance(part) for part in text.split(",") if part.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"must be distinct scales separated by commas, e.g. 1.5,3,5,7; got {text!r}"
        )
    return values


def sampling_arguments(
    parser: argparse.ArgumentParser,
    n_help: str,
    n_default: int | None,
    seed_help: str,
    several_scales: bool = False,
    batched: bool = True,
) -> argparse._ArgumentGroup:
    """batched: the command samples through the batched sampler, which can compile the DiT (--compile)."""
    group = parser.add_argument_group(
        "sampling (defaults: the checkpoint's own sample: settings, saved when it was trained)"
    )
    group.add_argument("--n", type=positive_int, default=n_default, help=n_help)
    group.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="scheduler steps (default: the checkpoint's sample.steps)",
    )
    if several_scales:
        group.add_argument(
            "--cfg",
            type=guidance_list,
            default=None,
            help="classifier-free guidance scale, or several separated by commas (1.5,3,5,7) to score "
            "each from the same checkpoint (default: the checkpoint's sample.guidance_scale)",
        )
    else:
        group.add_argument(
            "--cfg",
            type=guidance,
            default=None,
            help="classifier-free guidance scale (default: the checkpoint's sample.guidance_scale)",
        )
    group.add_argument(
        "--shift",
        type=positive_float,
        default=None,
        help="timestep shift of the schedule (default: the checkpoint's sample.shift)",
    )
    group.add_argument(
        "--scheduler",
        default=None,
        help="a diffusers flow-matching scheduler class, e.g. FlowMatchHeunDiscreteScheduler "
        "(default: the checkpoint's sample.scheduler)",
    )
    group.add_argument(
        "--gate-shift",
        type=positive_float,
        default=None,
        help="time gates (strategies time, joint) read shift_time(t, this) instead of t: the paper's "
        "manual repair, no retraining (default: the checkpoint's sample.gate_shift, 1 = nominal)",
    )
    group.add_argument("--seed", type=seed, default=0, help=seed_help)
    if batched:
        group.add_argument(
            "--compile",
            choices=COMPILE_CHOICES,
            default="auto",
            help="run the DiT blocks compiled (torch.compile): auto where the job's own timed steps "
            "show that it pays back its compile cost, on, or off (default: auto)",
        )
    group.add_argument(
        "--text-encoder",
        default=None,
        help="the LLM to load instead of the path stored in a semroute checkpoint (the same model moved)",
    )
    return group


def set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set model.strategy=depth --set train.lr=3e-4 "
        "(repeatable; values read as YAML and checked like the file's)",
    )
