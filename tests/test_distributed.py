"""Two CPU processes (gloo) under `accelerate launch` train like one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from .conftest import tiny_run_config

WORKER = Path(__file__).with_name("ddp_worker.py")


def launch(config: Path, out: Path, processes: int) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # --multi_gpu on a machine without GPUs runs torch.distributed on CPU with the gloo backend.
    command += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--cpu", "--num_processes", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    done = subprocess.run([*command, "--main_process_port", env["MASTER_PORT"], str(WORKER), str(config), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_llama_dir):
    raw = tiny_run_config(tiny_llama_dir, max_steps=4, batch_size=8, checkpoint_every=100, threads=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    launch(config, tmp_path / "ddp", 2)
    launch(config, tmp_path / "single", 1)
    rank0, rank1 = load_file(tmp_path / "ddp" / "rank0.safetensors"), load_file(tmp_path / "ddp" / "rank1.safetensors")
    single = load_file(tmp_path / "single" / "rank0.safetensors")
    moved = 0
    for name, w in single.items():
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(rank0[name], w, rtol=1e-4, atol=1e-5, msg=f"{name}: 2 processes vs 1")
        moved += int(w.abs().sum() > 0)
    assert moved > len(single) // 2
    assert (tmp_path / "ddp" / "checkpoints" / "step_000004").is_dir()
