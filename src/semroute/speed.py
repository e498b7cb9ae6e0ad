"""Speed choices made on the machine at hand, never hard-wired: the attention kernel and mask form, and
whether a training run compiles its DiT blocks.

- Attention: a short probe (forward + backward of demo-sized self- and cross-attention, each candidate
  alternating, fastest round kept) runs once per machine and is cached beside the precision probe.
  PyTorch's own kernel choice with a boolean mask is kept unless another candidate is measured faster
  by a clear margin; where no text token is padded the mask is dropped unless that measured slower.
  On CUDA and MPS PyTorch's own selection is used as it is.
- Compilation (`train.compile`, and `--compile` of the sampling commands): the run itself is the probe. With
`auto`, the first steps are timed
  eagerly; if the training time left can pay back the compile cost (as last measured on this machine),
  the DiT blocks are compiled with torch.compile, the first compiled step's cost is shown, and the
  compiled steps are timed in turn: they are kept only when measured faster, else the run goes back to
  eager. `on` compiles (and keeps) regardless, `off` never compiles. A sampler is timed the same way,
  step by step over its full batches (a last, smaller batch runs eager rather than compile again).
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .attention import (
    ATTENTION_BACKENDS,
    MASK_FORMS,
    AttentionChoice,
    attention,
    cross_mask,
    current_attention,
    use_attention,
)
from .base import COMPILE_CHOICES, check_choice, one_line
from .runtime import (
    cached_measurement,
    configure_device,
    cpu_capability,
    store_measurement,
    stored_measurement,
)

logger = logging.getLogger(__name__)

# Another attention candidate must take at most this share of the default's time to be chosen.
ATTENTION_MARGIN = 0.9
# auto compiles only when the eager training time left is at least PAYBACK x the expected compile cost.
PAYBACK = 5.0
# The compile cost assumed before one was measured on this machine (seconds; 40 s measured on a 2-core AVX2
# CPU).
COMPILE_COST_GUESS = 60.0
# Steps not timed after a (re)start of either mode, and steps timed in each mode.
WARM_STEPS, TIMED_STEPS = 2, 8
# Compiled steps must take at most this share of the eager ones to be kept.
COMPILE_KEEP = 0.95


def _time_attention(choice: AttentionChoice, tensors: dict, padded: bool) -> float:
    """Seconds of a forward + backward of demo-sized
    self-attention and cross-attention, in `choice`'s form."""
    previous = current_attention()
    use_attention(choice)
    try:
        q, k, v, tk, tv, keep = (tensors[n] for n in ("q", "k", "v", "tk", "tv", "keep"))
        keep = keep if padded else torch.ones_like(keep)
        mask = cross_mask(keep, choice)
        start = time.perf_counter()
        out = attention(q, k, v) + attention(q, tk, tv, mask)
        out.sum().backward()
        return time.perf_counter() - start
    finally:
        use_attention(previous)


def measure_attention(device: torch.device, rounds: int = 5) -> dict:
    """Time every kernel x mask form on `device` and return
    the choice as a dict (cached by `attention_choice`)."""
    generator = torch.Generator().manual_seed(0)
    B, heads, N, S, d = 16, 3, 64, 12, 64  # 8x8 image tokens, heads of 64, a short prompt: the demo's shapes

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device).requires_grad_(True)

    keep = torch.ones(B, S, dtype=torch.bool)
    keep[::2, S // 2 :] = False  # half the prompts padded
    tensors = dict(
        q=randn(B, heads, N, d),
        k=randn(B, heads, N, d),
        v=randn(B, heads, N, d),
        tk=randn(B, heads, S, d),
        tv=randn(B, heads, S, d),
        keep=keep.to(device),
    )
    candidates = [AttentionChoice(b, m) for b in ATTENTION_BACKENDS for m in MASK_FORMS]
    times: dict[str, list[float]] = {f"{c.backend}/{c.mask}": [] for c in candidates}
    for c in candidates:  # warm-up
        _time_attention(c, tensors, padded=True)
    for _ in range(rounds):
        for c in candidates:
            times[f"{c.backend}/{c.mask}"].append(_time_attention(c, tensors, padded=True))
    best = {name: min(ts) for name, ts in times.items()}
    default = best["default/bool"]
    name = min(best, key=lambda k: best[k])
    if best[name] > ATTENTION_MARGIN * default:
        name = "default/bool"
    backend, mask = name.split("/")
    # Unpadded prompts: the chosen mask form (all True) against no mask at all.
    masked = AttentionChoice(backend, mask, skip_unpadded=False)
    unmasked = AttentionChoice(backend, mask, skip_unpadded=True)
    with_mask, without = [], []
    for _ in range(rounds):
        with_mask.append(_time_attention(masked, tensors, padded=False))
        without.append(_time_attention(unmasked, tensors, padded=False))
    skip = min(without) <= min(with_mask) / ATTENTION_MARGIN
    return {
        "backend": backend,
        "mask": mask,
        "skip_unpadded": skip,
        "seconds": {**best, "unpadded/mask": min(with_mask), "unpadded/none": min(without)},
    }


def _valid_attention(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("backend") in ATTENTION_BACKENDS
        and entry.get("mask") in MASK_FORMS
        and isinstance(entry.get("skip_unpadded"), bool)
        and isinstance(entry.get("seconds"), dict)
    )


@dataclass
class Choice:
    """The attention choice, with why, as printed once and recorded in a run's summary."""

    value: AttentionChoice
    reason: str


def attention_choice(device: torch.device) -> Choice:
    """The attention kernel and mask form for `device`: measured
    once per machine on a CPU, PyTorch's own elsewhere."""
    if device.type != "cpu":
        return Choice(AttentionChoice(), f"PyTorch's own kernel selection on {device.type}")
    entry = cached_measurement(device, "attention", lambda: measure_attention(device), _valid_attention)
    choice = AttentionChoice(entry["backend"], entry["mask"], entry["skip_unpadded"])
    seconds = {k: v for k, v in entry["seconds"].items() if isinstance(v, (int, float)) and v > 0}
    default, chosen = seconds.get("default/bool"), seconds.get(f"{choice.backend}/{choice.mask}")
    if (choice.backend, choice.mask) == ("default", "bool"):
        verdict = f"the library default; no other form measured {1 / ATTENTION_MARGIN:.2f}x faster"
    elif default and chosen:
        verdict = f"measured {default / chosen:.2f}x faster than the library default"
    else:
        verdict = "measured faster than the library default"
    timings = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in seconds.items())
    return Choice(choice, f"{verdict} on this CPU ({cpu_capability()})" + (f": {timings}" if timings else ""))


_announced: set[str] = set()


def configure(device: torch.device) -> dict:
    """Process-wide speed settings for `device` (TF32 on CUDA, the measured attention form); logged once per
    process.

    Returns what was chosen and why, for a run's summary."""
    configure_device(device)
    attention = attention_choice(device)
    use_attention(attention.value)
    text = f"attention {attention.value.backend} kernel, {attention.value.mask} mask" + (
        ", none where nothing is padded" if attention.value.skip_unpadded else ""
    )
    if text not in _announced:
        _announced.add(text)
        logger.info("%s: %s", text, attention.reason)
    return {
        "attention": {**asdict(attention.value), "reason": attention.reason},
        "threads": torch.get_num_threads(),
    }


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with, or None (then nothing is compiled)."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _valid_cost(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e5


@dataclass
class StepCompiler:
    """Decides, from the run's own step times, whether its DiT blocks run compiled (see the module's
    docstring).

    Call `observe(seconds, steps_left)` after every step; `record()` is what a summary keeps. `pause()` runs
    eager without forgetting the compiled code (work of another shape, e.g. a sampler's last, smaller batch);
    `resume()` undoes it. agree(flag) -> flag every process agrees on (the minimum under several
    processes)."""

    model: torch.nn.Module
    mode: str
    device: torch.device
    agree: Callable[[bool], bool] | None = None
    # What is being run (in messages) and the cache key of its compile cost on this machine.
    work: str = "training"
    cost_key: str = "compile_seconds"
    phase: str = "eager"  # eager (timing) | first-call | compiled (timing) | done
    eager: list[float] = field(default_factory=list)
    compiled: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    used: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        check_choice(self.mode, COMPILE_CHOICES, "compile")
        if self.mode == "off":
            self.phase, self.reason = "done", "compile is off"
        self._seen = 0
        self._compiled: list[Callable] = []

    @property
    def compiling(self) -> bool:
        """Whether the next step is the first compiled one (whose failure falls back to eager)."""
        return self.phase == "first-call"

    def _agreed(self, flag: bool) -> bool:
        return bool(self.agree(flag)) if self.agree is not None else flag

    def observe(self, seconds: float, steps_left: int) -> None:
        if self.phase == "done":
            return
        self._seen += 1
        if self.phase == "eager":
            if self._seen > WARM_STEPS:
                self.eager.append(seconds)
            if len(self.eager) >= TIMED_STEPS or (steps_left <= 0 and self.eager):
                self._decide(steps_left)
        elif self.phase == "first-call":
            self.first_call_s = seconds
            eager = statistics.median(self.eager)
            store_measurement(self.device, self.cost_key, max(seconds - eager, 1e-3))
            logger.info(
                "torch.compile: the first compiled %s step took %.0f s (compiling the DiT blocks; inductor "
                "caches the kernels on disk for later runs)",
                self.work,
                seconds,
            )
            self.phase, self._seen = "compiled", 0
        elif self.phase == "compiled":
            if self._seen > 1:  # the step after the first may still compile (e.g. a last, shorter batch)
                self.compiled.append(seconds)
            if len(self.compiled) >= TIMED_STEPS or (steps_left <= 0 and self.compiled):
                self._verdict()

    def _decide(self, steps_left: int) -> None:
        eager = statistics.median(self.eager)
        if self.mode == "on":
            go, why = True, "compile is on"
        elif cpp_compiler() is None:
            go, why = (
                False,
                "no C++ compiler found (torch.compile builds CPU kernels with g++; apt-get install g++)",
            )
        else:
            cost = stored_measurement(self.device, self.cost_key, _valid_cost) or COMPILE_COST_GUESS
            left = eager * steps_left
            go = left >= PAYBACK * cost
            why = (
                f"about {left:.0f} s of {self.work} left, compiling costs about {cost:.0f} s here"
                if go
                else f"too short to pay it back: about {left:.0f} s of {self.work} left, compiling costs "
                f"about {cost:.0f} s here (it must be {PAYBACK:g}x that)"
            )
        if not self._agreed(go):
            self.phase, self.reason = "done", f"not compiled: {why}"
            logger.info("torch.compile (%s): %s", self.work, self.reason)
            return
        logger.info(
            "torch.compile: compiling the DiT blocks for %s (%s); eager steps take %.3f s",
            self.work,
            why,
            eager,
        )
        self._compile(True)
        self.phase, self.reason = "first-call", why

    def _blocks(self) -> list[torch.nn.Module]:
        return list(self.model.blocks)  # type: ignore[arg-type]  # a ModuleList, typed as a plain Module

    def _compile(self, on: bool) -> None:
        if on and not self._compiled:
            self._compiled = [torch.compile(block.forward) for block in self._blocks()]
        if not on:
            self._compiled = []
        self._install(on)
        self.used = on

    def _install(self, on: bool) -> None:
        blocks = self._blocks()
        compiled_forwards: list[Callable | None] = list(self._compiled) or [None] * len(blocks)
        for block, compiled in zip(blocks, compiled_forwards, strict=True):
            if on and compiled is not None:
                block.forward = compiled
            elif "forward" in vars(block):
                del block.forward

    def pause(self) -> None:
        """Run eager for now (the compiled code is kept for `resume`)."""
        if self.used:
            self._install(False)

    def resume(self) -> None:
        if self.used:
            self._install(True)

    def failed(self, err: BaseException) -> None:
        """The first compiled step raised: run eager from now on, in one line."""
        self._compile(False)
        self.phase = "done"
        self.reason = f"torch.compile failed, running eager: {one_line(err, 300)}"
        logger.warning("%s", self.reason)

    def _verdict(self) -> None:
        eager, compiled = statistics.median(self.eager), statistics.median(self.compiled)
        ratio = compiled / eager
        keep = self.mode == "on" or ratio <= COMPILE_KEEP
        keep = self._agreed(keep)
        if not keep:
            self._compile(False)
        verdict = "kept" if keep else "dropped, back to eager"
        self.reason += f"; compiled steps take {ratio:.2f}x the eager time: {verdict}"
        logger.info(
            "torch.compile: compiled %s steps %.3f s against eager %.3f s (%.2fx the time): %s",
            self.work,
            compiled,
            eager,
            ratio,
            verdict,
        )
        self.phase = "done"

    def record(self) -> dict:
        def med(xs: list[float]) -> float | None:
            return round(statistics.median(xs), 5) if xs else None

        return {
            "mode": self.mode,
            "used": self.used,
            "reason": self.reason,
            "eager_step_s": med(self.eager),
            "compiled_step_s": med(self.compiled),
            "first_call_s": self.first_call_s,
        }
