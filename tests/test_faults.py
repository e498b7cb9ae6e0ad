"""Real faults, on real files: a full disk (a small tmpfs), a file-size limit, a read-only disk, SIGTERM,
and damaged (truncated, zero-byte, corrupted) copies of every file a checkpoint, cache or pipeline holds.

Nothing here mocks the fault it survives. A tmpfs needs the right to mount (root here and in CI); without
it those tests skip and say so, and the file-size-limit test (a real RLIMIT_FSIZE) still covers a write
that the disk refuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semroute.checkpoint import (
    MANIFEST_FILE,
    checkpoint_problem,
    default_modes,
    list_checkpoints,
)
from semroute.cli import main
from semroute.config import load_config
from semroute.resume import newest_loadable

from .conftest import tiny_run_config
from .test_bad_inputs import assert_answered, run_cli, snapshot


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip()}); the RLIMIT_FSIZE test covers refused writes"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def write_config(tmp_path: Path, tiny_llama_dir: Path, **train) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, **train)))
    return path


def test_full_disk_while_checkpointing_keeps_every_checkpoint_and_resumes(tiny_llama_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_llama_dir, max_steps=12, checkpoint_every=2, keep_checkpoints=10)
    with tmpfs(tmp_path / "disk", "3m") as disk:  # two checkpoints of about 1.2 MB fit, the third does not
        code, err = run_cli(
            capsys, ["train", "--config", str(config), "--out", str(disk / "run"), "--device", "cpu"]
        )
        assert_answered(code, err, "No space left on device")
        assert "earlier checkpoints are untouched" in err
        good = list_checkpoints(disk / "run")
        assert good and all(checkpoint_problem(c) is None for c in good)
        assert not list((disk / "run" / "checkpoints").glob(".*"))  # no half-written checkpoint left behind
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(["train", "--config", str(config), "--out", str(disk / "run"), "--device", "cpu"]) == 0
        assert json.loads((disk / "run" / "summary.json").read_text())["steps"] == 12


def test_read_only_output_is_one_line(tiny_llama_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_llama_dir, max_steps=2)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as disk:
        code, err = run_cli(capsys, ["train", "--config", str(config), "--out", str(disk / "run")])
        assert_answered(code, err, "Read-only file system")


def test_file_size_limit_while_checkpointing_is_one_line(tiny_llama_dir, tmp_path):
    """A real RLIMIT_FSIZE in a child process: the first weights file (230 kB) is refused by the kernel."""
    config = write_config(tmp_path, tiny_llama_dir, max_steps=4, checkpoint_every=2)

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write raises EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "semroute",
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "File too large" in lines[-1] and "could not write the checkpoint" in lines[-1]
    assert not list_checkpoints(tmp_path / "run") and not list((tmp_path / "run" / "checkpoints").glob(".*"))


@pytest.fixture(scope="module")
def two_checkpoints(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A finished run with checkpoints at steps 2 and 4, and its config file."""
    root = tmp_path_factory.mktemp("faults")
    config = write_config(root, tiny_llama_dir, max_steps=4, checkpoint_every=2, keep_checkpoints=5)
    assert main(["train", "--config", str(config), "--out", str(root / "run"), "--device", "cpu"]) == 0
    return root / "run", config


def flip_one_byte(data: bytes) -> bytes:
    """Bit rot: one byte in the middle inverted, the size
    unchanged (a valid JSON file may stay valid JSON)."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "zero-byte": lambda data: b"",
    "corrupted": lambda data: b"{[ not: json, nor yaml",  # for the text files
    "one byte flipped": flip_one_byte,
}
# A cache opened for training is checked by size and header only (it may be terabytes); precompute checks
# digests.
SIZE_DAMAGES = {k: v for k, v in DAMAGES.items() if k != "one byte flipped"}


def rewrite_record(checkpoint: Path) -> None:
    """Make checkpoint.json agree with the files again, as a tool that rewrote them consistently would."""
    from semroute.fileio import record_files

    (checkpoint / MANIFEST_FILE).write_text(
        json.dumps({"format": 2, **record_files(checkpoint, skip=(MANIFEST_FILE,))})
    )


def damaged_files(directory: Path, tmp_path: Path, damages=DAMAGES, under: Path | None = None):
    """(label, copy of `directory` with one file damaged, that file's copy) for every file (of `under`,
    default all of `directory`) and every damage; the text files are also corrupted."""
    for file in sorted(p for p in (under or directory).rglob("*") if p.is_file()):
        rel = file.relative_to(directory)
        for name, damage in damages.items():
            if name == "corrupted" and file.suffix not in (".json", ".yaml"):
                continue
            copy = tmp_path / f"{directory.name}-{rel.as_posix().replace('/', '_')}-{name}"
            shutil.copytree(directory, copy)
            (copy / rel).write_bytes(damage((copy / rel).read_bytes()))
            yield f"{rel} {name}", copy, copy / rel


def damaged_copies(run: Path, tmp_path: Path):
    """`damaged_files` of the run, one file of its newest checkpoint at a time."""
    return damaged_files(run, tmp_path, under=list_checkpoints(run)[-1])


def test_every_damaged_checkpoint_file_falls_back_to_the_previous_checkpoint(
    two_checkpoints, tmp_path, caplog
):
    run, config_path = two_checkpoints
    config = load_config(run / "run_config.yaml")
    cases = 0
    for label, copy, file in damaged_copies(run, tmp_path):
        caplog.clear()
        found = newest_loadable(copy, config)
        assert found is not None and found[0].name == "step_000002", label
        assert file.name in caplog.text, label  # the warning names the damaged file
        cases += 1
    assert cases >= 20  # 12 files, truncated and zero-byte each, and the text files corrupted


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(two_checkpoints, tmp_path):
    run, config_path = two_checkpoints
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step_000004" / "training_state" / "optimizer.pt").write_bytes(b"")
    assert (
        main(["train", "--config", str(config_path), "--out", str(tmp_path / "run"), "--max-steps", "6"]) == 0
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_sampling_a_damaged_checkpoint_is_one_line_naming_the_file(two_checkpoints, tmp_path, capsys):
    run, _ = two_checkpoints
    cases = 0
    for label, copy, file in damaged_copies(run, tmp_path):
        if file.parent.name == "training_state":  # sampling does not read the training state
            continue
        checkpoint = file.parent if file.parent.name.startswith("step_") else file.parent.parent
        code, err = run_cli(
            capsys,
            [
                "sample",
                "--checkpoint",
                str(checkpoint),
                "--prompt",
                "one red square",
                "--out",
                str(tmp_path / "s.png"),
            ],
        )
        assert_answered(code, err, file.name)
        # The run directory skips the damaged checkpoint and samples the one before.
        assert (
            main(
                [
                    "sample",
                    "--checkpoint",
                    str(copy),
                    "--prompt",
                    "one red square",
                    "--n",
                    "1",
                    "--steps",
                    "1",
                    "--out",
                    str(tmp_path / "s.png"),
                ]
            )
            == 0
        ), label
        cases += 1
    assert cases >= 10


def test_a_run_that_cannot_be_read_is_refused_never_restarted(two_checkpoints, tmp_path, capsys):
    run, config_path = two_checkpoints
    # Every checkpoint damaged: nothing to resume from, and nothing may be overwritten.
    shutil.copytree(run, tmp_path / "broken")
    for checkpoint in list_checkpoints(tmp_path / "broken"):
        (checkpoint / "training_state" / "model.safetensors").write_bytes(b"")
    before = snapshot(tmp_path / "broken")
    code, err = run_cli(capsys, ["train", "--config", str(config_path), "--out", str(tmp_path / "broken")])
    assert_answered(code, err, "none can be resumed")
    assert snapshot(tmp_path / "broken") == before
    # Checkpoints from a version that knows a config key this one does not (their sizes consistent).
    shutil.copytree(run, tmp_path / "future")
    for checkpoint in list_checkpoints(tmp_path / "future"):
        run_config = checkpoint / "run_config.yaml"
        run_config.write_text(run_config.read_text().replace("train:\n", "train:\n  future_option: 1\n"))
        rewrite_record(checkpoint)
    before = snapshot(tmp_path / "future")
    code, err = run_cli(capsys, ["train", "--config", str(config_path), "--out", str(tmp_path / "future")])
    assert_answered(code, err, "cannot be read by this semroute")
    assert snapshot(tmp_path / "future") == before


def test_rerunning_a_finished_run_keeps_its_summary(two_checkpoints, tmp_path):
    run, config_path = two_checkpoints
    shutil.copytree(run, tmp_path / "run")
    before = (tmp_path / "run" / "summary.json").read_text()
    assert main(["train", "--config", str(config_path), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "summary.json").read_text() == before
    summary = json.loads(before)
    assert summary["final_loss"] > 0 and summary["images_per_s"] > 0  # real figures, valid JSON (no NaN)


def test_checkpoints_get_the_users_normal_permissions(two_checkpoints):
    run, _ = two_checkpoints
    dir_mode, file_mode = default_modes()
    for path in [*list_checkpoints(run), *list_checkpoints(run)[-1].rglob("*")]:
        assert path.stat().st_mode & 0o777 == (dir_mode if path.is_dir() else file_mode), path


def test_sigterm_saves_a_checkpoint_and_exits_in_one_line(tiny_llama_dir, tmp_path):
    config = write_config(tmp_path, tiny_llama_dir, max_steps=100000, checkpoint_every=100000, log_every=1)
    out = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "semroute",
            "train",
            "--config",
            str(config),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 3
    ):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "stopped by SIGTERM at step" in last and "run the same command again to resume" in last
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None
    step = int(checkpoints[0].name.split("_")[1])
    assert f"step {step};" in last and step >= 3


def test_a_second_writer_is_refused_naming_the_holder(two_checkpoints, tmp_path, capsys):
    from semroute.fileio import OutputLock

    run, config_path = two_checkpoints
    with OutputLock(tmp_path / "run"):
        code, err = run_cli(capsys, ["train", "--config", str(config_path), "--out", str(tmp_path / "run")])
        assert_answered(code, err, f"another semroute process (pid {os.getpid()}) is writing to")
        code, err = run_cli(capsys, ["export", "--checkpoint", str(run), "--out", str(tmp_path / "run")])
        assert_answered(code, err, "is writing to")
    assert not list((tmp_path / "run").iterdir())  # refused before anything was written; the lock is gone


def test_training_from_a_damaged_cache_is_one_line_naming_the_file(
    tiny_llama_dir, tiny_encoder, tmp_path, capsys
):
    from semroute.precompute import precompute

    from .conftest import write_image_folder
    from .test_data import image_run_config

    rows = write_image_folder(tmp_path / "data", n=7)
    (tmp_path / "data" / "train.json").write_text(json.dumps(rows))
    raw = image_run_config(
        tiny_llama_dir, {"manifest": str(tmp_path / "data" / "train.json")}, max_steps=1, batch_size=2
    )
    precompute(
        load_config(raw), tmp_path / "cache", shard_size=4, dtype="fp32", progress=False, encoder=tiny_encoder
    )
    cases = 0
    for label, copy, file in damaged_files(tmp_path / "cache", tmp_path, SIZE_DAMAGES):
        raw["dataset"] = {"cache": str(copy), "resolution": 16}
        config = tmp_path / "cache.yaml"
        config.write_text(yaml.safe_dump(raw))
        code, err = run_cli(
            capsys,
            ["train", "--config", str(config), "--out", str(tmp_path / "run" / label.replace(" ", "-"))],
        )
        assert_answered(code, err, file.name)
        cases += 1
    assert cases >= 10  # cache.json (3 ways), null.safetensors and 3 shards (2 ways each)


def test_precompute_again_remakes_a_shard_whose_bytes_changed(tiny_llama_dir, tiny_encoder, tmp_path, caplog):
    from semroute.precompute import precompute

    from .conftest import write_image_folder
    from .test_data import image_run_config

    rows = write_image_folder(tmp_path / "data", n=7)
    (tmp_path / "data" / "train.json").write_text(json.dumps(rows))
    config = load_config(
        image_run_config(tiny_llama_dir, {"manifest": str(tmp_path / "data" / "train.json")})
    )
    cache = tmp_path / "cache"
    precompute(config, cache, shard_size=4, dtype="fp32", progress=False, encoder=tiny_encoder)
    shard = cache / "shard_00001.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(flip_one_byte(original))  # same size, readable header: only the digest tells
    precompute(config, cache, shard_size=4, dtype="fp32", progress=False, encoder=tiny_encoder)
    assert "sha256 mismatch" in caplog.text and shard.name in caplog.text
    assert shard.read_bytes() == original  # made again, identical
    # Kept aside, not deleted
    assert (cache / (shard.name + ".damaged")).read_bytes() == flip_one_byte(original)


def test_a_damaged_exported_pipeline_is_one_line_naming_the_file(two_checkpoints, tmp_path, capsys):
    run, _ = two_checkpoints
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "pipe")]) == 0
    # Written aside, then renamed: nothing left over, beside it or inside (the lock is gone with its holder)
    assert [p.name for p in tmp_path.glob(".pipe*")] == []
    assert not (tmp_path / "pipe" / ".semroute.lock").exists()
    cases = 0
    for _label, copy, file in damaged_files(tmp_path / "pipe", tmp_path):
        code, err = run_cli(
            capsys,
            [
                "sample",
                "--checkpoint",
                str(copy),
                "--prompt",
                "one red square",
                "--n",
                "1",
                "--out",
                str(tmp_path / "s.png"),
            ],
        )
        assert_answered(
            code, err, file.name if file.name != "semroute_export.json" else "semroute_export.json"
        )
        cases += 1
    assert cases >= 20


class _Payload:
    """Unpickling this runs a command: what a checkpoint from an untrusted source could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_file_that_runs_code_when_loaded_is_refused(two_checkpoints, tmp_path, capsys):
    import torch

    run, config_path = two_checkpoints
    shutil.copytree(run, tmp_path / "run")
    newest = list_checkpoints(tmp_path / "run")[-1]
    marker = tmp_path / "executed"
    optimizer = newest / "training_state" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, optimizer)
    rewrite_record(newest)  # sizes and digests consistent: only the content lies
    code, err = run_cli(
        capsys, ["train", "--config", str(config_path), "--out", str(tmp_path / "run"), "--max-steps", "6"]
    )
    assert_answered(code, err, "optimizer.pt cannot be read (Weights only load failed")
    assert not marker.exists()  # refused by torch's weights-only unpickler: nothing ran


def test_out_of_memory_is_one_line(tiny_llama_dir, tmp_path):
    """A real allocation the machine cannot give: math attention over a million image tokens (16 TB of
    scores).

    The math kernel comes from this machine's cached attention choice, written here: the run honours it."""
    from semroute.runtime import PROBE_FILE, PROBE_VERSION, machine_key

    raw = tiny_run_config(tiny_llama_dir, max_steps=2, batch_size=2)
    raw["model"].update(sample_size=1024, patch_size=1)
    raw["data"]["image_size"] = 1024
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    cache = tmp_path / "cache"
    cache.mkdir()
    math_kernel = {"backend": "math", "mask": "bool", "skip_unpadded": True, "seconds": {}}
    (cache / PROBE_FILE).write_text(
        json.dumps(
            {machine_key(torch.device("cpu")): {"attention": math_kernel, "probe_version": PROBE_VERSION}}
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "semroute",
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SEMROUTE_CACHE": str(cache)},
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[-1].startswith("semroute: error: ran out of memory; lower train.batch_size")


# ------------------------------------------------------------------ fuzzing the checkpoint loader

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
MUTATIONS = st.one_of(
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(b"")),
    st.tuples(st.just("append"), st.just(1.0), st.binary(min_size=1, max_size=64)),
)


def mutate(data: bytes, how: str, where: float, payload: bytes) -> bytes:
    at = int(where * len(data))
    if how == "overwrite":
        return data[:at] + payload + data[at + len(payload) :]
    return data[:at] if how == "truncate" else data + payload


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.integers(0, 100), mutation=MUTATIONS, record=st.none() | JSON_VALUES)
def test_fuzzed_checkpoints_resume_from_a_good_one_or_refuse_in_one_line(
    two_checkpoints, tmp_path_factory, capsys, target, mutation, record
):
    """A random change to one file of the newest checkpoint (or a random checkpoint.json) resumes from a
    checkpoint whose files are intact, or is refused in one line; nothing is trained over what cannot be
    read."""
    run, config_path = two_checkpoints
    copy = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(run, copy)
    newest = list_checkpoints(copy)[-1]
    if record is not None:
        (newest / MANIFEST_FILE).write_text(json.dumps(record))
    else:
        files = sorted(p for p in newest.rglob("*") if p.is_file())
        file = files[target % len(files)]
        file.write_bytes(mutate(file.read_bytes(), *mutation))
    code, err = run_cli(
        capsys, ["train", "--config", str(config_path), "--out", str(copy), "--max-steps", "5"]
    )
    assert "Traceback" not in err
    if code == 2:
        assert_answered(code, err, "")
        return
    assert code == 0, err
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["steps"] == 5
    assert checkpoint_problem(list_checkpoints(copy)[-1]) is None
