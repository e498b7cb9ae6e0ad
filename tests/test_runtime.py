"""Device and precision chosen for the machine: each branch
with the probe and availability faked, the cache, the CLI."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from semroute import runtime
from semroute.runtime import check_precision, resolve_device, resolve_precision


def fixed(ratio):
    calls = []

    def measure(device):
        calls.append(device)
        return ratio

    measure.calls = calls
    return measure


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    return monkeypatch


def test_precision_names():
    assert [check_precision(p) for p in ("auto", "fp32", "bf16", "fp16", "no")] == [
        "auto",
        "fp32",
        "bf16",
        "fp16",
        "fp32",
    ]
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        check_precision("fp8")


def test_cpu_that_emulates_bf16_gets_fp32_and_says_why(no_gpu):
    probe = fixed(11.0)
    p = resolve_precision("auto", "cpu", ratio=probe)
    assert (p.name, p.autocast_dtype, p.accelerate, p.dtype) == ("fp32", None, "no", torch.float32)
    assert (
        p.describe() == f"precision fp32: bf16 measured 11.0x slower on this CPU ({runtime.cpu_capability()})"
    )
    assert len(probe.calls) == 1


def test_cpu_with_native_bf16_gets_bf16(no_gpu):
    p = resolve_precision("auto", "cpu", ratio=fixed(0.4))
    assert (p.name, p.autocast_dtype, p.accelerate) == ("bf16", torch.bfloat16, "bf16")
    assert "2.5x faster than fp32" in p.reason
    # A tie is not worth bf16's rounding.
    assert resolve_precision("auto", "cpu", ratio=fixed(0.95)).name == "fp32"


def test_asking_for_bf16_on_an_emulating_cpu_works_but_warns(no_gpu, caplog):
    with caplog.at_level(logging.WARNING, logger="semroute.runtime"):
        p = resolve_precision("bf16", "cpu", ratio=fixed(9.2))
    assert p.name == "bf16"
    assert (
        "bf16 asked for, but it measured 9.2x slower than fp32" in caplog.text
        and "auto would choose fp32" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="semroute.runtime"):
        resolve_precision("bf16", "cpu", ratio=fixed(0.3))
    assert not caplog.text


def test_fp32_never_probes_and_fp16_on_cpu_warns(no_gpu, caplog):
    probe = fixed(0.3)
    assert resolve_precision("fp32", "cpu", ratio=probe).name == "fp32" and not probe.calls
    with caplog.at_level(logging.WARNING, logger="semroute.runtime"):
        assert resolve_precision("fp16", "cpu", ratio=probe).name == "fp16"
    assert "no loss scaling" in caplog.text


def test_a_device_where_bf16_fails_gets_fp32(no_gpu):
    def broken(device):
        raise RuntimeError("bf16 autocast is not supported")

    assert resolve_precision("auto", "cpu", ratio=broken).name == "fp32"
    with pytest.raises(ValueError, match="bf16 does not run on this CPU"):
        resolve_precision("bf16", "cpu", ratio=broken)


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_cuda_takes_bf16_where_supported_else_fp16(cuda, bf16, expected):
    cuda.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    probe = fixed(0.3)
    p = resolve_precision("auto", "cuda", ratio=probe)
    assert p.name == expected and not probe.calls  # GPUs are decided by capability, not timed
    assert p.accelerate == expected
    if not bf16:
        assert "loss scaling" in p.reason
        with pytest.raises(ValueError, match="does not support bf16; use --precision fp16"):
            resolve_precision("bf16", "cuda")


def test_device_resolution(monkeypatch, cuda):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU; use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")
    for bad in ("tpu", "gpu0", "xla"):
        with pytest.raises(ValueError, match="valid: auto, cpu, cuda, cuda:N or mps"):
            resolve_device(bad)


def test_the_probe_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMROUTE_CACHE", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    probe = fixed(7.5)
    monkeypatch.setattr(runtime, "measure_bf16_ratio", probe)
    cpu = torch.device("cpu")
    assert runtime.bf16_ratio(cpu) == 7.5 and runtime.bf16_ratio(cpu) == 7.5
    assert len(probe.calls) == 1
    cached = json.loads((tmp_path / runtime.PROBE_FILE).read_text())
    assert list(cached) == [runtime.machine_key(cpu)] and runtime.cpu_capability() in runtime.machine_key(cpu)
    # An ISA limit is another machine as far as speed goes.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert runtime.bf16_ratio(cpu) == 7.5 and len(probe.calls) == 2
    assert len(json.loads((tmp_path / runtime.PROBE_FILE).read_text())) == 2
    # A damaged cache is measured again and rewritten, never an error.
    (tmp_path / runtime.PROBE_FILE).write_text("{not json")
    assert runtime.bf16_ratio(cpu) == 7.5 and len(probe.calls) == 3
    assert json.loads((tmp_path / runtime.PROBE_FILE).read_text())


def test_the_real_probe_times_both_precisions():
    ratio = runtime.measure_bf16_ratio(torch.device("cpu"), repeats=1)
    assert math.isfinite(ratio) and ratio > 0


def test_help_never_imports_torch():
    from semroute.cli.parser import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices

    code = (
        "import sys\n"
        "from semroute.cli import main\n"
        f"for argv in [['--help']] + [[c, '--help'] for c in {sorted(commands)!r}]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'accelerate') if m in "
        "sys.modules)\nprint(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_one_version_number(capsys):
    """pyproject.toml reads the version from semroute.__version__; metadata and --version agree."""
    import importlib.metadata

    import semroute
    from semroute.cli import main

    assert importlib.metadata.version("semroute") == semroute.__version__
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"semroute {semroute.__version__}"
