"""SIGKILL a real `semroute train` process at random moments,
resume each time, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from .conftest import tiny_run_config
from .test_reliability import state_tensors

MAX_STEPS = 16


def start(config: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "semroute", "train", "--config", str(config), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_for(condition, timeout: float = 180.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_llama_dir):
    raw = tiny_run_config(
        tiny_llama_dir,
        max_steps=MAX_STEPS,
        checkpoint_every=1,
        keep_checkpoints=2,
        threads=1,
        sample_grids=False,
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    checkpoints = tmp_path / "killed" / "checkpoints"
    rng = random.Random(1234)
    kills, during_write = 0, 0
    for attempt in range(5):
        process = start(config, tmp_path / "killed")
        # Wait until this process has written a checkpoint of its own, then kill it: either the moment
        # a checkpoint write is in progress (a hidden temporary directory exists) or after a random delay.
        before = {p.name for p in checkpoints.glob("step_*")} if checkpoints.is_dir() else set()
        if not wait_for(
            lambda: process.poll() is not None or ({p.name for p in checkpoints.glob("step_*")} - before)
        ):
            process.kill()
            raise AssertionError("no checkpoint appeared in time")
        if process.poll() is not None:
            break  # it finished before we got to kill it
        if attempt % 2 == 0:
            hit = wait_for(lambda: process.poll() is not None or any(checkpoints.glob(".step_*")), timeout=30)
            during_write += int(hit and process.poll() is None)
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    final = start(config, tmp_path / "killed")
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]
    reference = start(config, tmp_path / "whole")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
    print(f"survived {kills} SIGKILLs ({during_write} during a checkpoint write)")
    assert kills >= 4 and during_write >= 1
    name = f"step_{MAX_STEPS:06d}"
    a, b = state_tensors(checkpoints / name), state_tensors(tmp_path / "whole" / "checkpoints" / name)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after {kills} kills"
    assert not list(checkpoints.glob(".step_*"))
