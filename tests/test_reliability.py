"""Crash safety: exact resume, kept checkpoints, damaged checkpoints, non-finite steps."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from semroute.base import TrainingDiverged
from semroute.checkpoint import list_checkpoints
from semroute.config import load_config
from semroute.resume import newest_loadable
from semroute.train import train

from .conftest import tiny_run_config, write_image_folder


def state_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """Raw weights, EMA, every optimizer state tensor and every saved RNG state of a checkpoint."""
    state = checkpoint / "training_state"
    tensors = {f"model.{k}": v for k, v in load_file(state / "model.safetensors").items()}
    tensors.update({f"ema.{k}": v for k, v in load_file(state / "ema.safetensors").items()})
    optimizer = torch.load(state / "optimizer.pt", weights_only=False)["state"]
    for i, s in optimizer.items():
        tensors.update({f"adam.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    rng = torch.load(state / "rng.pt", weights_only=False)
    tensors["rng.generator"], tensors["rng.torch"] = rng["generator"], rng["torch"]
    tensors["rng.python"] = torch.tensor(rng["python"][1])
    tensors["rng.numpy"] = torch.as_tensor(rng["numpy"][1].astype("int64"))
    tensors["rng.numpy_position"] = torch.tensor(rng["numpy"][2])
    return tensors


def assert_same_state(a, b) -> None:
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs"
    sa, sb = (json.loads((c / "training_state" / "state.json").read_text()) for c in (a, b))
    assert sa == sb


def image_config(tiny_llama_dir, root, **train):
    rows = write_image_folder(root, n=10, size=(12, 12))
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    raw = tiny_run_config(tiny_llama_dir, **train)
    raw["model"]["sample_size"] = 12
    raw["dataset"] = {"manifest": str(root / "data.jsonl"), "resolution": 12}
    return raw


@pytest.mark.parametrize("data", ["shapes", "images"])
def test_n_steps_then_resume_to_2n_equals_2n_bitwise(tmp_path, tiny_llama_dir, tiny_encoder, data):
    # Image data: 10 images, batch 4 -> 2 batches an epoch, 2 micro-batches a step; the resume lands
    # mid-epoch.
    kwargs = dict(batch_size=4, checkpoint_every=3, gradient_accumulation_steps=2, mixed_precision="bf16")
    raw = (
        image_config(tiny_llama_dir, tmp_path / "data", **kwargs)
        if data == "images"
        else tiny_run_config(tiny_llama_dir, **kwargs)
    )
    raw["train"]["max_steps"] = 6
    whole = train(load_config(raw), tmp_path / "whole", progress=False, encoder=tiny_encoder)
    raw["train"]["max_steps"] = 3
    train(load_config(raw), tmp_path / "split", progress=False, encoder=tiny_encoder)
    raw["train"]["max_steps"] = 6
    resumed = train(load_config(raw), tmp_path / "split", progress=False, encoder=tiny_encoder)
    assert resumed.steps == whole.steps == 6
    assert_same_state(resumed.checkpoint, whole.checkpoint)
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["steps"] == 6


def test_resume_with_another_config_lists_the_differences_and_keeps_the_run(
    tmp_path, tiny_llama_dir, tiny_encoder
):
    raw = tiny_run_config(tiny_llama_dir, max_steps=2)
    result = train(load_config(raw), tmp_path, progress=False, encoder=tiny_encoder)
    before = state_tensors(result.checkpoint)
    raw["model"]["strategy"] = "single"
    raw["text_encoder"]["layers"] = [1, 2]
    raw["train"]["max_steps"] = 50  # the budget may change; the rest may not
    with pytest.raises(ValueError) as err:
        train(load_config(raw), tmp_path, progress=False, encoder=tiny_encoder)
    assert "model.strategy: checkpoint 'depth', now 'single'" in str(err.value)
    assert "text_encoder.layers: checkpoint [], now [1, 2]" in str(err.value)
    assert "new --out" in str(err.value)
    after = state_tensors(result.checkpoint)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load_config(tmp_path / "run_config.yaml").model.strategy == "depth"


def test_keeps_the_newest_k_and_clears_leftovers_of_killed_writes(tmp_path, tiny_llama_dir, tiny_encoder):
    raw = tiny_run_config(tiny_llama_dir, max_steps=6, checkpoint_every=1, keep_checkpoints=2)
    train(load_config(raw), tmp_path, progress=False, encoder=tiny_encoder)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005", "step_000006"]
    leftover = tmp_path / "checkpoints" / ".step_000007.abc123"
    (leftover / "training_state").mkdir(parents=True)
    raw["train"]["max_steps"] = 7
    train(load_config(raw), tmp_path, progress=False, encoder=tiny_encoder)
    assert not leftover.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006", "step_000007"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, tiny_llama_dir, tiny_encoder, caplog
):
    raw = tiny_run_config(tiny_llama_dir, max_steps=4, checkpoint_every=2)
    config = load_config(raw)
    train(config, tmp_path, progress=False, encoder=tiny_encoder)
    newest = tmp_path / "checkpoints" / "step_000004" / "training_state" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as a full disk would leave it
    with caplog.at_level(logging.WARNING):
        found, _ = newest_loadable(tmp_path, config)
    assert found.name == "step_000002" and "trying an older checkpoint" in caplog.text


def test_a_data_row_with_non_finite_features_is_skipped_and_counted(tmp_path, tiny_llama_dir, tiny_encoder):
    """A real non-finite row on disk (a cache shard with NaN text features, as an overflowing fp16 encoder
    would leave it) makes the real loss NaN on each step that draws it: those steps are skipped and
    counted."""
    from safetensors.torch import save_file

    from semroute.precompute import precompute

    from .test_data import image_run_config

    rows = write_image_folder(tmp_path / "data", n=8)
    (tmp_path / "data" / "train.json").write_text(
        json.dumps([{**r, "text": r["text"] if isinstance(r["text"], str) else r["text"][0]} for r in rows])
    )
    raw = image_run_config(
        tiny_llama_dir,
        {"manifest": str(tmp_path / "data" / "train.json")},
        batch_size=2,
        max_steps=8,
        checkpoint_every=100,
        caption_dropout=0.0,
    )
    precompute(
        load_config(raw), tmp_path / "cache", shard_size=8, dtype="fp32", progress=False, encoder=tiny_encoder
    )
    shard = tmp_path / "cache" / "shard_00000.safetensors"
    from safetensors import safe_open

    with safe_open(shard, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    tensors["text"][3] = float("nan")
    save_file(tensors, shard, metadata=metadata)  # same size and header: only the values went bad
    raw["dataset"] = {"cache": str(tmp_path / "cache"), "resolution": 16}
    result = train(load_config(raw), tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 8 rows in batches of 2: 4 steps an epoch, row 3 in one of them; 8 steps are 2 epochs.
    assert summary["nonfinite_steps"] == 2 and result.steps == 8
    state = json.loads((result.checkpoint / "training_state" / "state.json").read_text())
    # No EMA step on skipped steps
    assert state["ema_optimization_step"] == 6 and state["nonfinite_steps"] == 2
    assert all(torch.isfinite(v).all() for v in state_tensors(result.checkpoint).values())
    assert (
        max(
            json.loads(line)["nonfinite_steps"]
            for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
        )
        == 2
    )


def test_a_run_that_really_diverges_stops_and_keeps_the_good_checkpoint(
    tmp_path, tiny_llama_dir, tiny_encoder
):
    """No injected NaN: a learning rate of 1e30 blows the weights up to ~1e29 in one step, and every forward
    pass after it overflows. The run stops after max_nonfinite_steps and names the last good checkpoint."""
    raw = tiny_run_config(
        tiny_llama_dir, max_steps=50, checkpoint_every=2, max_nonfinite_steps=3, lr=1e30, warmup_steps=0
    )
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .*through step (\d+)\).*step_0000"):
        train(load_config(raw), tmp_path, progress=False, encoder=tiny_encoder)
    checkpoints = list_checkpoints(tmp_path)
    assert checkpoints
    for checkpoint in checkpoints:
        assert all(torch.isfinite(v).all() for v in state_tensors(checkpoint).values())
    log = (
        [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
        if (tmp_path / "log.jsonl").is_file()
        else []
    )
    assert all(entry["nonfinite_steps"] <= 3 for entry in log)


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, tiny_llama_dir, tiny_encoder):
    from diffusers.training_utils import EMAModel
    from torch.optim import AdamW

    from semroute.checkpoint import save_checkpoint
    from semroute.dit import DIT_PRESETS, SemanticRoutingDiT

    model = SemanticRoutingDiT(**DIT_PRESETS["tiny"], text_dim=32, num_text_layers=4)
    ema = EMAModel(model.parameters())
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="not all finite"):
        save_checkpoint(
            tmp_path / "step_000001",
            model,
            ema,
            AdamW(model.parameters()),
            {"step": 1},
            load_config(tiny_run_config(tiny_llama_dir)),
            tiny_encoder,
        )
    assert list(tmp_path.iterdir()) == []
