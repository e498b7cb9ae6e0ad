"""Reliability, round three: each class of fault with several cases, real files and real faults.

1. records checked before they are trusted; 2. degenerate input gets no confident number; 3. one error
boundary (one line, --debug for the traceback); 4. sizes bounded before allocation; 5. identity by real
path, paths stored relative to their record, leftovers removed, the lock where the output is; 6. each OS
error answered by its own errno.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semroute.base import (
    ERRNO_ADVICE,
    EXIT_BUG,
    EXIT_ERROR,
    SIZE_LIMITS,
    check_threads,
    cpu_count,
    io_advice,
    os_error_line,
)
from semroute.bench.trajectory import gate_shift_fit
from semroute.cli import describe, main
from semroute.config import load_config
from semroute.fileio import LOCK_NAME, OutputLock, confined_problem, files_problem, record_files
from semroute.flow import shift_time
from semroute.loading import pipeline_problem, remove_export_leftovers
from semroute.runtime import PROBE_VERSION, plausible_bf16_ratio, store_measurement, stored_measurement

from .conftest import make_tiny_llama, tiny_run_config
from .test_bad_inputs import assert_answered, run_cli


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, tmp_path_factory) -> Path:
    """A finished tiny run (4 steps) and its config file beside it."""
    root = tmp_path_factory.mktemp("round3")
    (root / "c.yaml").write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=4)))
    assert (
        main(["train", "--config", str(root / "c.yaml"), "--out", str(root / "run"), "--device", "cpu"]) == 0
    )
    return root / "run"


# ------------------------------------------------------------------ 1. records checked before use


def test_ablate_refuses_to_mix_step_budgets_or_configs(tiny_llama_dir, tiny_encoder, tmp_path):
    from semroute.bench.ablation import run_ablation

    raw = tiny_run_config(tiny_llama_dir)
    base = load_config(raw)
    out = tmp_path / "ablation"
    run_ablation(base, out, ["b2"], 1, None, 1, max_steps=2, encoder=tiny_encoder, progress=False)
    before = (out / "runs" / "b2-seed0" / "finished.json").read_bytes()
    # Another budget: refused, naming both budgets; nothing retrained or rescored.
    with pytest.raises(ValueError, match="max_steps: run 2, now 3"):
        run_ablation(base, out, ["b2"], 1, None, 1, max_steps=3, encoder=tiny_encoder, progress=False)
    # Another config (the learning rate): refused, naming it.
    raw["train"]["lr"] = 1e-4
    with pytest.raises(ValueError, match=r"train\.lr"):
        run_ablation(
            load_config(raw), out, ["b2"], 1, None, 1, max_steps=2, encoder=tiny_encoder, progress=False
        )
    assert (out / "runs" / "b2-seed0" / "finished.json").read_bytes() == before
    # The same budget and config: accepted, nothing trained again; the whole tree moved: still found.
    moved = tmp_path / "elsewhere" / "ablation"
    moved.parent.mkdir()
    shutil.move(out, moved)
    result = run_ablation(base, moved, ["b2"], 1, None, 1, max_steps=2, encoder=tiny_encoder, progress=False)
    assert result["summary"]
    assert (moved / "runs" / "b2-seed0" / "finished.json").read_bytes() == before
    # A damaged record is one line naming it.
    (moved / "runs" / "b2-seed0" / "finished.json").write_bytes(b"")
    (moved / "runs" / "b2-seed0" / "shapesbench.json").unlink()
    with pytest.raises(ValueError, match="finished-run record .*finished.json is not valid JSON"):
        run_ablation(base, moved, ["b2"], 1, None, 1, max_steps=2, encoder=tiny_encoder, progress=False)


@pytest.mark.parametrize(
    ("value", "believed"),
    [
        (1.3, True),
        (0.4, True),
        (0.001, False),  # no block runs bf16 1000x faster
        (1e6, False),
        (float("nan"), False),
        (-2.0, False),
        ("fast", False),
        (True, False),
        (None, False),
    ],
)
def test_a_cached_precision_probe_is_believed_only_when_it_can_be_true(value, believed):
    assert plausible_bf16_ratio(value, torch.device("cpu")) is believed


def test_bf16_faster_is_not_believed_on_a_cpu_without_bf16_kernels(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not plausible_bf16_ratio(0.5, torch.device("cpu"))  # emulated bf16 cannot be 2x faster
    assert plausible_bf16_ratio(12.0, torch.device("cpu"))


def test_probe_entries_of_another_version_are_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMROUTE_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    store_measurement(cpu, "bf16_over_fp32", 1.5)
    assert stored_measurement(cpu, "bf16_over_fp32", lambda v: True) == 1.5
    probe = tmp_path / "precision-probe.json"
    cached = json.loads(probe.read_text())
    for entry in cached.values():
        assert entry["probe_version"] == PROBE_VERSION
        entry["probe_version"] = PROBE_VERSION - 1
    probe.write_text(json.dumps(cached))
    assert stored_measurement(cpu, "bf16_over_fp32", lambda v: True) is None


@pytest.mark.parametrize(
    "name",
    ["../outside.txt", "/etc/hostname", "a/../../outside.txt", "~/x", "", "link/passwd", 7],
)
def test_export_records_cannot_name_files_outside_the_export(tmp_path, name):
    root = tmp_path / "export"
    root.mkdir()
    (tmp_path / "outside.txt").write_text("not the export's")
    (root / "link").symlink_to("/etc")
    record = {"format": 2, "files": {name: 10}, "sha256": {}}
    problem = files_problem(root, record)
    assert problem is not None and (
        "outside the directory" in problem or "not a plain relative path" in problem
    )
    assert confined_problem(root, "model_index.json") is None


def test_a_checkpoint_sampled_with_another_llm_of_the_same_shape_is_refused(finished, tmp_path, capsys):
    other = make_tiny_llama(tmp_path / "other_llama", seed=1)  # same shape, other weights
    code, err = run_cli(
        capsys,
        ["sample", "--checkpoint", str(finished), "--prompt", "a", "--n", "1", "--text-encoder", str(other),
         "--out", str(tmp_path / "x.png")],
    )  # fmt: skip
    assert_answered(code, err, "embedding weights differ")
    assert not (tmp_path / "x.png").exists()
    # The same model moved elsewhere is accepted.
    record = json.loads((finished / "checkpoints" / "step_000004" / "text_encoder.json").read_text())
    moved = tmp_path / "moved_llama"
    shutil.copytree(record["model"], moved)
    code, err = run_cli(
        capsys,
        ["sample", "--checkpoint", str(finished), "--prompt", "a", "--n", "1", "--text-encoder", str(moved),
         "--out", str(tmp_path / "y.png")],
    )  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize("own", [["summary.json", "run_config.yaml"], ["notes.txt"], ["samples/a.png"]])
def test_training_into_a_directory_of_the_users_own_files_is_refused(tiny_llama_dir, tmp_path, capsys, own):
    out = tmp_path / "mine"
    for name in own:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's own")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=2)))
    code, err = run_cli(capsys, ["train", "--config", str(config), "--out", str(out), "--device", "cpu"])
    assert_answered(code, err, "holds files that are not a semroute run")
    assert all((out / name).read_text() == "the user's own" for name in own)
    assert sorted(p.name for p in out.iterdir()) == sorted({Path(n).parts[0] for n in own})


# ------------------------------------------------------------------ 2. degenerate input, no confident number


@pytest.mark.parametrize(
    ("nominal", "why"),
    [
        ([1.0], "only 0 sampling step"),  # --steps 1: the one state is pure noise
        ([1.0, 0.5], "only 1 sampling step"),
        ([1.0, 0.0], "only 0 sampling step"),
        ([0.75, 0.5], "only 2 sampling step"),
    ],
)
def test_a_gate_shift_is_not_fitted_from_too_little(nominal, why):
    t = torch.tensor(nominal, dtype=torch.float64)
    shift, reason = gate_shift_fit(nominal, shift_time(t, 2.0).tolist())
    assert shift is None and why in reason


def test_a_gate_shift_at_the_edge_of_the_search_is_no_fit():
    t = torch.linspace(0.9, 0.1, 9, dtype=torch.float64)
    shift, reason = gate_shift_fit(t.tolist(), shift_time(t, 50.0).tolist())  # beyond the grid's 10
    assert shift is None and "edge of the searched range" in reason
    shift, reason = gate_shift_fit(t.tolist(), shift_time(t, 2.5).tolist())
    assert shift == pytest.approx(2.5, rel=0.01) and reason == ""


def test_a_precompute_that_caches_nothing_says_so(tiny_llama_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"not a png")
        rows.append({"image": f"images/{i}.png", "text": f"caption {i}"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_run_config(tiny_llama_dir)
    raw["dataset"] = {"manifest": str(manifest), "resolution": 12}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    code, err = run_cli(capsys, ["precompute", "--config", str(config), "--out", str(tmp_path / "cache")])
    assert_answered(code, err, "no row was cached")
    assert "train on it" not in err


def test_a_real_image_table_of_one_seed_claims_no_spread():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "real_images", Path(__file__).resolve().parents[1] / "benchmarks" / "real_images.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._mean_sd({"mean": 0.25, "sd": None}, ".3f") == "0.250 (1 seed)"
    assert module._mean_sd({"mean": 0.25, "sd": 0.01}, ".3f") == "0.250 ± 0.010"


# ------------------------------------------------------------------ 3. one error boundary


@pytest.mark.parametrize(
    ("error", "phrase", "code"),
    [
        (KeyError("rows"), "internal error: KeyError", EXIT_BUG),
        (AttributeError("'NoneType' object has no attribute 'x'"), "--debug", EXIT_BUG),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not valid UTF-8", EXIT_ERROR),
        (json.JSONDecodeError("Expecting value", "", 0), "not valid JSON", EXIT_ERROR),
        (csv.Error("field larger than field limit (131072)"), "not valid CSV", EXIT_ERROR),
        (OSError(errno.ENOSPC, "No space left on device", "/x"), "the disk is full", EXIT_ERROR),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "ran out of memory", EXIT_ERROR),
        (ValueError("a clear message"), "a clear message", EXIT_ERROR),
    ],
)
def test_every_exception_becomes_one_line(error, phrase, code):
    message, got = describe(error)
    assert phrase in message and got == code and "\n" not in message


def test_debug_shows_the_traceback_and_otherwise_one_line(tmp_path, capsys, monkeypatch):
    argv = [
        "sample",
        "--checkpoint",
        str(tmp_path / "nothing"),
        "--prompt",
        "a",
        "--out",
        str(tmp_path / "x.png"),
    ]
    code, err = run_cli(capsys, argv)
    assert_answered(code, err, "does not exist")
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])
    monkeypatch.setenv("SEMROUTE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


@pytest.mark.parametrize("prompt", ["\udcff", "ok \udcfe\udcff", "\udc80tail"])
def test_a_prompt_that_is_not_utf8_is_one_line(prompt, tmp_path, capsys):
    code, err = run_cli(capsys, ["sample", "--checkpoint", str(tmp_path), "--prompt", prompt])
    assert_answered(code, err, "is not valid UTF-8 text")


@pytest.mark.parametrize(
    "content",
    [
        'Prompt,Category\n"' + "x" * 200_000 + '",a\n',  # a field past the csv module's limit
        "Prompt,Category\nshort,a\n" + "y" * 140_000 + ",b\n",  # unquoted, on line 3
        "Prompt,Category\nshort," + "z" * 300_000 + "\n",  # in the second column
    ],
)
def test_a_drawbench_file_the_csv_module_refuses_is_one_line_naming_it(content, tmp_path):
    from semroute.bench.public import read_prompts

    path = tmp_path / "drawbench.csv"
    path.write_bytes(content.encode())
    with pytest.raises(ValueError, match="drawbench.csv line .* is not readable CSV"):
        read_prompts("drawbench", path)


def test_a_pipeline_without_its_record_and_a_weight_names_what_is_missing(finished, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(finished), "--out", str(export)]) == 0
    (export / "semroute_export.json").unlink()
    for weights in (export / "transformer").glob("*.safetensors"):
        weights.unlink()
    assert "lacks the weights in" in pipeline_problem(export)
    code, err = run_cli(
        capsys, ["sample", "--checkpoint", str(export), "--prompt", "a", "--out", str(tmp_path / "x.png")]
    )
    assert_answered(code, err, "lacks the weights in")
    shutil.rmtree(export / "scheduler")
    assert "scheduler" in pipeline_problem(export)


@pytest.mark.parametrize("threads", [0, 10**6, 2**31 - 1])
def test_a_thread_count_past_the_machine_is_refused_before_openmp_sees_it(
    threads, tiny_llama_dir, tmp_path, capsys
):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=1, threads=threads)))
    code, err = run_cli(
        capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"]
    )
    assert code == 2 and "train.threads" in err and "Traceback" not in err
    assert check_threads(cpu_count(), "t") == cpu_count()


# ------------------------------------------------------------------ 4. sizes bounded before allocation


SIZE_KEYS = {
    "train.batch_size": "batch_size",
    "train.gradient_accumulation_steps": "gradient_accumulation_steps",
    "train.keep_checkpoints": "keep_checkpoints",
    "train.length_grouping": "length_grouping",
    "sample.images_per_prompt": "images_per_prompt",
    "sample.steps": "sampling_steps",
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(SIZE_KEYS)), value=st.integers(min_value=1, max_value=2**31 - 1))
def test_size_like_settings_are_bounded(tiny_llama_dir, key, value):
    raw = tiny_run_config(tiny_llama_dir)
    section, name = key.split(".")
    raw[section][name] = value
    if value > SIZE_LIMITS[SIZE_KEYS[key]]:
        with pytest.raises(ValueError, match=f"{key} {value} is past the sensible limit"):
            load_config(raw)
    else:
        load_config(raw)


def test_a_batch_too_big_for_memory_is_refused_before_the_first_step(
    tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    import semroute.base

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=1, batch_size=2**31 - 1)))
    code, err = run_cli(
        capsys, ["train", "--config", str(config), "--out", str(tmp_path / "a"), "--device", "cpu"]
    )
    assert_answered(code, err, "is past the sensible limit")
    # Within the sense limit but past this machine's memory (shrunk here to 1 MiB): refused before training.
    monkeypatch.setattr(semroute.base, "physical_memory", lambda: 2**20)
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=1, batch_size=4096)))
    code, err = run_cli(
        capsys, ["train", "--config", str(config), "--out", str(tmp_path / "b"), "--device", "cpu"]
    )
    assert_answered(code, err, "more than this machine's")
    assert not list((tmp_path / "b").glob("checkpoints/*"))


# ------------------------------------------------------------------ 5. identity by real path


def test_a_symlink_to_a_locked_output_is_the_same_output(tmp_path):
    out = tmp_path / "run"
    alias = tmp_path / "alias"
    alias.symlink_to(out, target_is_directory=True)
    with OutputLock(out):
        assert (out / LOCK_NAME).is_file()  # the lock lives in the output, not in its parent
        assert not list(tmp_path.glob(".*.lock"))
        for spelling in (alias, tmp_path / "x" / ".." / "run", Path(os.path.relpath(out))):
            (tmp_path / "x").mkdir(exist_ok=True)
            with pytest.raises(ValueError, match="another semroute process"), OutputLock(spelling):
                pass
    assert not (out / LOCK_NAME).exists()  # removed by its holder
    with OutputLock(alias):  # free again, by any spelling
        pass


@contextlib.contextmanager
def read_only_parent_with_writable_child(root: Path):
    """parent: a read-only file system; parent/out: a writable one mounted inside it (real mounts)."""
    parent, out = root / "parent", root / "parent" / "out"
    parent.mkdir()
    mounted = []
    try:
        for cmd in (
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(parent)],
            ["mkdir", str(out)],
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)],
            ["mount", "-o", "remount,ro", str(parent)],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"cannot set up the mounts here ({done.stderr.strip()})")
            if cmd[0] == "mount" and "remount,ro" not in cmd:
                mounted.append(cmd[-1])
        yield parent, out
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", where], capture_output=True)


def test_a_writable_output_in_a_read_only_parent_can_be_locked(tmp_path):
    with read_only_parent_with_writable_child(tmp_path) as (parent, out):
        with pytest.raises(OSError):
            (parent / "probe").write_text("x")  # the parent really is read-only
        with OutputLock(out):
            assert (out / LOCK_NAME).exists()


def test_a_killed_exports_hidden_copy_is_removed_by_the_next(finished, tmp_path):
    out = tmp_path / "export"
    leftover = tmp_path / ".export.k1ll3d_x"
    (leftover / "transformer").mkdir(parents=True)
    (leftover / "transformer" / "big.safetensors").write_bytes(b"0" * 1000)
    unrelated = tmp_path / ".export.lock"
    unrelated.write_text("a lock file, not a copy")
    other = tmp_path / ".exported.abcdefgh"
    other.mkdir()
    assert main(["export", "--checkpoint", str(finished), "--out", str(out)]) == 0
    assert not leftover.exists() and other.exists()
    assert pipeline_problem(out) is None
    assert remove_export_leftovers(out) == []


def test_a_checkpoint_loads_from_another_working_directory_after_its_run_moved(
    tiny_llama_dir, tmp_path, monkeypatch
):
    from semroute.pipeline import load_pipeline

    work = tmp_path / "work"
    shutil.copytree(tiny_llama_dir, work / "models" / "llama")
    raw = tiny_run_config(Path("models/llama"), max_steps=2)  # relative to the working directory
    (work / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(work)
    assert main(["train", "--config", "c.yaml", "--out", "runs/r", "--device", "cpu"]) == 0
    shutil.move(work / "runs", tmp_path / "archive")
    monkeypatch.chdir(tmp_path)
    pipe = load_pipeline(tmp_path / "archive" / "r", device="cpu", precision="fp32")
    assert pipe.generate(["a"], 2, 1.0).shape[0] == 1


# ------------------------------------------------------------------ 6. each OS error by its own errno


@pytest.mark.parametrize(
    "code",
    [
        errno.ENOSPC,
        errno.EACCES,
        errno.EROFS,
        errno.EEXIST,
        errno.ELOOP,
        errno.ENOTDIR,
        errno.EDQUOT,
        errno.EFBIG,
    ],
)
def test_each_errno_gets_its_own_advice_naming_the_path(code):
    line = os_error_line(OSError(code, os.strerror(code), "/data/out"))
    assert "/data/out" in line and ERRNO_ADVICE[code] in line and errno.errorcode[code] in line
    others = [ERRNO_ADVICE[c] for c in ERRNO_ADVICE if ERRNO_ADVICE[c] != ERRNO_ADVICE[code]]
    assert not any(advice in line for advice in others)


def test_library_errors_carry_their_errno_through():
    assert (
        io_advice(RuntimeError("I/O error: No space left on device (os error 28)"), "x") == ERRNO_ADVICE[28]
    )
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert io_advice(wrapped, "x") == ERRNO_ADVICE[errno.EROFS]
    assert io_advice(RuntimeError("nothing known"), "the fallback") == "the fallback"


def test_real_faults_get_advice_that_fits_them(finished, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=2)))
    # --out is an existing file.
    (tmp_path / "a_file").write_text("x")
    code, err = run_cli(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "a_file")])
    assert code == 2 and "Traceback" not in err and "free space" not in err
    # --out is a symlink loop.
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    code, err = run_cli(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "loop")])
    assert code == 2 and "Traceback" not in err and "free space" not in err
    assert "loop" in err.lower()
    # The model cache cannot be created (a file where its directory would be).
    monkeypatch.setenv("SEMROUTE_CACHE", str(tmp_path / "a_file" / "cache"))
    from semroute.text_encoder import convert_gguf

    with pytest.raises(OSError, match="set SEMROUTE_CACHE to a writable directory"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "a_file" / "cache" / "m")


def test_exports_records_list_only_files_inside(finished, tmp_path):
    record = record_files(finished / "checkpoints" / "step_000004")
    assert all(
        confined_problem(finished / "checkpoints" / "step_000004", name) is None for name in record["files"]
    )
