"""Two CPU processes (gloo) under `accelerate launch` train like one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from semroute.checkpoint import WEIGHTS_FILE as WEIGHTS

from .conftest import tiny_run_config

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    """A port no one listens on now: each launch gets its own, so a previous group's socket cannot collide."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, *script: str) -> None:
    """`accelerate launch` with `processes` CPU processes (gloo)
    running `script` (a file or `-m module` and its arguments)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    # --multi_gpu on a machine without GPUs runs torch.distributed on CPU with the gloo backend.
    command += (
        ["--multi_gpu", "--num_processes", str(processes)]
        if processes > 1
        else ["--cpu", "--num_processes", "1"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    done = subprocess.run(
        [*command, "--main_process_port", env["MASTER_PORT"], *script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_llama_dir):
    raw = tiny_run_config(tiny_llama_dir, max_steps=4, batch_size=8, checkpoint_every=100, threads=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    launch(2, str(WORKER), str(config), str(tmp_path / "ddp"))
    launch(1, str(WORKER), str(config), str(tmp_path / "single"))
    rank0, rank1 = (
        load_file(tmp_path / "ddp" / "rank0.safetensors"),
        load_file(tmp_path / "ddp" / "rank1.safetensors"),
    )
    single = load_file(tmp_path / "single" / "rank0.safetensors")
    moved = 0
    for name, w in single.items():
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(rank0[name], w, rtol=1e-4, atol=1e-5, msg=f"{name}: 2 processes vs 1")
        moved += int(w.abs().sum() > 0)
    assert moved > len(single) // 2
    assert (tmp_path / "ddp" / "checkpoints" / "step_000004").is_dir()


def test_fsdp_on_two_processes_matches_one_and_resumes_both_ways(tmp_path, tiny_llama_dir):
    """train.fsdp shards the DiT over two gloo processes: it ends with one process's weights (same global
    batch), and its checkpoints are the single-process ones: each resumes the other's run."""
    import json
    import shutil

    raw = tiny_run_config(tiny_llama_dir, max_steps=4, batch_size=8, checkpoint_every=2, threads=1)
    raw["train"].update(fsdp=True, sample_grids=True)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    launch(2, str(WORKER), str(config), str(tmp_path / "fsdp"))
    launch(1, str(WORKER), str(config), str(tmp_path / "single"))

    def weights(run, rank=0):
        return load_file(tmp_path / run / f"rank{rank}.safetensors")

    single = weights("single")

    def close_to_single(found, what):
        assert found.keys() == single.keys()
        for name, w in single.items():
            torch.testing.assert_close(found[name], w, rtol=1e-4, atol=1e-5, msg=f"{name}: {what}")

    summaries = {run: json.loads((tmp_path / run / "summary.json").read_text()) for run in ("fsdp", "single")}
    assert summaries["fsdp"]["fsdp"] and summaries["fsdp"]["processes"] == 2  # sharded, not DDP
    assert not summaries["single"]["fsdp"] and summaries["single"]["processes"] == 1
    assert all(torch.equal(weights("fsdp", 0)[k], weights("fsdp", 1)[k]) for k in single)
    close_to_single(weights("fsdp"), "FSDP on 2 processes vs 1 process")
    # The checkpoints hold the same full state, in the same layout.
    for name in ("training_state/model.safetensors", "training_state/ema.safetensors", WEIGHTS):
        a = load_file(tmp_path / "fsdp" / "checkpoints" / "step_000004" / name)
        b = load_file(tmp_path / "single" / "checkpoints" / "step_000004" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    assert (tmp_path / "fsdp" / "samples" / "step_000002.png").is_file()  # previews from the gathered EMA
    # Resume across: FSDP's step-2 checkpoint under one process, one process's under FSDP.
    for source, processes, target in (("fsdp", 1, "fsdp-then-single"), ("single", 2, "single-then-fsdp")):
        shutil.copytree(tmp_path / source / "checkpoints", tmp_path / target / "checkpoints")
        shutil.rmtree(tmp_path / target / "checkpoints" / "step_000004")
        launch(processes, str(WORKER), str(config), str(tmp_path / target))
        close_to_single(weights(target), f"resumed from {source}'s step 2 on {processes} process(es)")


def test_sample_bench_shared_by_two_processes_writes_what_one_writes(tmp_path, tiny_llama_dir):
    from semroute.cli import main

    raw = tiny_run_config(tiny_llama_dir, max_steps=3, checkpoint_every=100, threads=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    prompts = tmp_path / "drawbench.csv"
    prompts.write_text(
        "Prompt,Category\none red square,Counting\ntwo blue circles,Counting\none blue square,Colors\n"
        "two red squares,Counting\none red circle,Colors\n",
        encoding="utf-8",
    )
    args = [
        "-m",
        "semroute",
        "sample-bench",
        "--checkpoint",
        str(tmp_path / "run"),
        "--bench",
        "drawbench",
        "--prompts",
        str(prompts),
        "--n",
        "2",
        "--batch-size",
        "3",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    launch(2, *args, "--out", str(tmp_path / "two"))
    launch(1, *args, "--out", str(tmp_path / "one"))
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    # The images, prompts.json and the settings record
    assert len(one) == 5 * 2 + 2 and one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], f"{name} differs between 2 processes and 1"
    # An interrupted shared run resumes: the missing images come back identical.
    for name in ("images/001_1.png", "images/004_0.png"):
        (tmp_path / "two" / name).unlink()
    launch(2, *args, "--out", str(tmp_path / "two"))
    assert files_of(tmp_path / "two") == one


def test_precompute_shared_by_two_processes_writes_what_one_writes(tmp_path, tiny_llama_dir):
    import json

    from .conftest import write_image_folder
    from .test_data import image_run_config

    rows = write_image_folder(tmp_path / "data", n=7)
    manifest = tmp_path / "data" / "train.json"
    manifest.write_text(json.dumps(rows))
    raw = image_run_config(tiny_llama_dir, {"manifest": str(manifest)})
    raw["train"]["mixed_precision"] = "fp32"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    args = ["-m", "semroute", "precompute", "--config", str(config), "--shard-size", "3", "--device", "cpu"]
    launch(2, *args, "--out", str(tmp_path / "two"))
    launch(1, *args, "--out", str(tmp_path / "one"))
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert (
        sorted(one)
        == sorted(two)
        == [
            "cache.json",
            "null.safetensors",
            "shard_00000.safetensors",
            "shard_00001.safetensors",
            "shard_00002.safetensors",
            "shard_00003.safetensors",
        ]
    )
    for name in one:
        assert one[name] == two[name], f"{name} differs between 2 processes and 1"
