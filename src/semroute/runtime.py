"""Where a model runs and in what precision: chosen for the machine at hand, never hard-wired.

`auto` precision picks bf16 only where it is measured faster than fp32 on this device: a CPU
without native bf16 instructions emulates it about 10x slower. The measurement is a short timed
forward + backward of one DiT block in each precision, cached per machine, so it runs once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import PartialState

from .base import PRECISIONS, check_choice
from .blocks import DiTBlock, rope_2d
from .fileio import write_json
from .text_encoder import cache_root

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)

# accelerate's name for full precision, written by older run configs.
_ALIASES = {"no": "fp32"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
# bf16 must take at most this share of fp32's time to be picked: a tie is not worth the rounding.
BF16_FASTER = 0.8
PROBE_FILE = "precision-probe.json"
# The way the probes are measured and stored; an entry written another way is measured again.
PROBE_VERSION = 2


def check_precision(name: str, key: str = "precision") -> str:
    """The canonical precision name ('no' reads as fp32); anything else is an error listing the valid ones."""
    return check_choice(_ALIASES.get(name, name), PRECISIONS, key)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` is the first of cuda, mps, cpu that is available; an explicit device must exist."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; valid: {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} asked for, but this torch build sees no CUDA GPU; use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"device {spec!r} asked for, but MPS is not available here; use --device cpu or auto"
            )
    elif device.type != "cpu":
        raise ValueError(f"unknown device {spec!r}; valid: {DEVICE_CHOICES}")
    return device


def configure_device(device: torch.device) -> None:
    """Process-wide settings for fast kernels on this device (TF32 matmuls on CUDA)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class Precision:
    """A resolved precision and why it was chosen."""

    name: str  # fp32 | bf16 | fp16
    requested: str  # what the user asked for (auto | fp32 | bf16 | fp16)
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype to autocast to; None means plain fp32."""
        return None if self.name == "fp32" else self.dtype

    @property
    def accelerate(self) -> str:
        """accelerate's `mixed_precision` value."""
        return "no" if self.name == "fp32" else self.name

    def describe(self) -> str:
        return f"precision {self.name}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_capability() -> str:
    """What torch's CPU kernels were built for on this machine (e.g. AVX2, AVX512)."""
    return torch.backends.cpu.get_cpu_capability()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device) -> str:
    """What the bf16/fp32 speed ratio depends on: the processor,
    torch, and the ISA limits set in the environment."""
    if device.type == "cpu":
        hardware = f"{_cpu_model()} [{cpu_capability()}]"
    else:
        hardware = f"{device.type} {platform.machine()}"
    limits = ",".join(
        f"{k}={os.environ[k]}"
        for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
        if k in os.environ
    )
    return f"{hardware} | torch {torch.__version__}" + (f" | {limits}" if limits else "")


def _synchronize(device: torch.device) -> None:
    if device.type == "mps":
        torch.mps.synchronize()


def time_block(device: torch.device, dtype: torch.dtype | None, repeats: int = 4) -> list[float]:
    """Seconds of one forward + backward of a demo-sized DiT
    block (8 images of 8x8 tokens), autocast to `dtype`."""
    generator = torch.Generator().manual_seed(0)
    hidden, heads, batch, grid, text = 192, 3, 8, 8, 12
    block = DiTBlock(hidden, heads, 2.0, grid, mlp_conv=True, adaln=True).to(device)
    x = torch.randn(batch, grid * grid, hidden, generator=generator).to(device).requires_grad_(True)
    c = torch.randn(batch, hidden, generator=generator).to(device)
    kv = tuple(
        torch.randn(batch, heads, text, hidden // heads, generator=generator).to(device) for _ in range(2)
    )
    mask = torch.ones(batch, text, dtype=torch.bool, device=device)
    rope = tuple(r.to(device) for r in rope_2d(grid, grid, hidden // heads))
    times = []
    for _ in range(repeats + 1):  # the first call warms up kernels and caches
        start = time.perf_counter()
        with (
            torch.enable_grad(),
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            out = block(x, c, rope, kv, mask)
            out.float().square().mean().backward()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def measure_bf16_ratio(device: torch.device, repeats: int = 4) -> float:
    """Time of a bf16 DiT block step over an fp32 one on `device` (< 1: bf16 is faster).

    The two precisions alternate and the fastest run of each is kept, so a busy machine slows both alike.
    """
    fp32, bf16 = [], []
    for _ in range(repeats):
        fp32 += time_block(device, None, repeats=1)
        bf16 += time_block(device, torch.bfloat16, repeats=1)
    return min(bf16) / min(fp32)


def _probe_path() -> Path:
    return cache_root() / PROBE_FILE


def _read_probes() -> dict:
    try:
        cached = json.loads(_probe_path().read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def stored_measurement(device: torch.device, name: str, valid: Callable[[Any], bool]) -> Any:
    """This machine's cached `name` (see `cached_measurement`),
    or None where there is none that `valid` accepts."""
    entry = _read_probes().get(machine_key(device))
    if not isinstance(entry, dict) or name not in entry or entry.get("probe_version") != PROBE_VERSION:
        return None
    try:
        return entry[name] if valid(entry[name]) else None
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def store_measurement(device: torch.device, name: str, value: Any) -> None:
    """Cache `value` as this machine's `name`; a cache that
    cannot be written only means measuring again next time."""
    path, key = _probe_path(), machine_key(device)
    cached = _read_probes()
    entry = cached[key] if isinstance(cached.get(key), dict) else {}
    if entry.get("probe_version") != PROBE_VERSION:
        entry = {}  # measured another way: none of it is kept
    cached[key] = {
        **entry,
        name: value,
        "probe_version": PROBE_VERSION,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cached)
    except OSError as err:
        logger.warning("could not cache the %s probe in %s (%s)", name, path, err)


def cached_measurement(
    device: torch.device, name: str, measure: Callable[[], Any], valid: Callable[[Any], bool]
) -> Any:
    """`measure()` once per machine and `name`, cached in $SEMROUTE_CACHE/precision-probe.json under
    `machine_key`.

    valid(value) -> bool checks a cached value before it is trusted: a damaged, hand-edited or foreign entry
    is measured again and rewritten, never believed and never an error."""
    value = stored_measurement(device, name, valid)
    if value is not None:
        return value
    logger.info(
        "timing %s on this %s once (a few seconds; cached in %s)",
        name.replace("_", " "),
        device.type,
        _probe_path(),
    )
    value = measure()
    store_measurement(device, name, value)
    return value


def _positive_finite(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


# A bf16/fp32 step-time ratio outside this range is no measurement of a DiT block (the slowest emulated bf16
# seen is about 15x; no CPU or GPU runs bf16 50x faster).
PLAUSIBLE_BF16_RATIO = (0.02, 50.0)


def plausible_bf16_ratio(value: object, device: torch.device) -> bool:
    """A cached bf16/fp32 ratio that can be believed on `device`: a finite positive number in a plausible
    range, and not 'bf16 faster' on a CPU whose oneDNN has no bf16 kernels (where bf16 is emulated)."""
    if not _positive_finite(value):
        return False
    ratio = float(value)  # type: ignore[arg-type]
    low, high = PLAUSIBLE_BF16_RATIO
    if not low <= ratio <= high:
        return False
    return not (device.type == "cpu" and ratio < 1 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_ratio(device: torch.device) -> float:
    """`measure_bf16_ratio`, measured once per machine and cached ($SEMROUTE_CACHE/precision-probe.json);
    a cached value that cannot be true here is measured again."""
    return float(
        cached_measurement(
            device,
            "bf16_over_fp32",
            lambda: measure_bf16_ratio(device),
            lambda value: plausible_bf16_ratio(value, device),
        )
    )


def _speed_words(ratio: float) -> str:
    if ratio < 1:
        return f"{1 / ratio:.1f}x faster"
    return f"{ratio:.1f}x slower"


def resolve_precision(
    requested: str, device: torch.device | str = "cpu", ratio: Callable[[torch.device], float] | None = None
) -> Precision:
    """Turn auto | fp32 | bf16 | fp16 into the precision to run in on `device`, with its reason.

    ratio: a function device -> bf16/fp32 time ratio (default: the cached probe; tests pass their own).
    """
    requested = check_precision(requested)
    device = resolve_device(device)
    ratio = ratio or bf16_ratio
    where = f"this CPU ({cpu_capability()})" if device.type == "cpu" else f"this {device.type} device"
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            if bf16_ok:
                return Precision("bf16", requested, "the GPU supports bf16")
            return Precision("fp16", requested, "the GPU has no bf16; fp16 with loss scaling")
        if requested == "bf16" and not bf16_ok:
            raise ValueError(
                "this GPU does not support bf16; use --precision fp16 (with loss scaling) or auto"
            )
        return Precision(requested, requested, "asked for")
    if requested == "fp32":
        return Precision("fp32", requested, "asked for")
    if requested == "fp16":
        logger.warning(
            "fp16 on %s: no loss scaling off CUDA, and most CPUs emulate fp16 matmuls; auto or fp32 is "
            "usually faster and safer",
            where,
        )
        return Precision("fp16", requested, "asked for")
    try:
        r = ratio(device)
    except RuntimeError as err:  # e.g. an MPS build without bf16 autocast
        if requested == "bf16":
            raise ValueError(f"bf16 does not run on {where} ({err}); use --precision fp32 or auto") from None
        return Precision("fp32", requested, f"bf16 does not run on {where}")
    if requested == "bf16":
        if r > BF16_FASTER:
            logger.warning(
                "bf16 asked for, but it measured %s than fp32 on %s: --precision auto would choose fp32",
                _speed_words(r),
                where,
            )
        return Precision("bf16", requested, f"asked for; measured {_speed_words(r)} than fp32 on {where}")
    if r <= BF16_FASTER:
        return Precision("bf16", requested, f"measured {_speed_words(r)} than fp32 on {where}")
    return Precision("fp32", requested, f"bf16 measured {_speed_words(r)} on {where}")


def process_state(device: str) -> Any:
    """accelerate's state of this process. A CPU-only machine is named as such: accelerate 1.15 asked for
    `auto` there joins no process group under `accelerate launch --multi_gpu`, and every process thinks it is
    the main one."""
    return PartialState(cpu=resolve_device(device).type == "cpu")


def training_precision(requested: str, device: str) -> Precision:
    """The precision a training run uses; with several processes
    the main one measures first and the rest reuse its cache."""
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(
            f"training takes --device auto, cpu, cuda or mps, got {device!r}; to pick one GPU of several "
            f"set CUDA_VISIBLE_DEVICES (accelerate launch gives each process its own GPU)"
        )
    kind = resolve_device(device).type
    with process_state(device).main_process_first():
        return resolve_precision(requested, kind)
