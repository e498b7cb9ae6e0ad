"""benchmarks/real_images.py carries finished runs across sessions: their small records under --out count as
finished with an empty --work (nothing trained or scored again, the same table), the samples grid is redrawn
from stored columns, and records of another budget are refused before anything trains."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROWS = ("b1", "b2")
SEEDS = 2
STEPS, EVAL_STEPS = 40, 5
PROMPTS = [f"a small emoji number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def real_images():
    spec = importlib.util.spec_from_file_location(
        "real_images", Path(__file__).resolve().parents[1] / "benchmarks" / "real_images.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_grid_column_round_trips_through_its_png(real_images, tmp_path):
    images = torch.rand(5, 3, 16, 16)
    real_images.save_column(images, tmp_path / "grid.png")
    back = real_images.load_column(tmp_path / "grid.png")
    assert back.shape == images.shape
    torch.testing.assert_close(
        back, (images * 255).round() / 255, rtol=0, atol=1e-6
    )  # 8 bits, nothing else lost
    with pytest.raises(ValueError, match="square RGB"):
        real_images.save_column(torch.rand(2, 3, 8, 6), tmp_path / "bad.png")
    Image.fromarray(np.zeros((10, 4, 3), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="not a column of square images"):
        real_images.load_column(tmp_path / "odd.png")


def _data_set(root: Path) -> Path:
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i, text in enumerate(PROMPTS):
        Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(data / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "text": text})
    (data / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _scored_run(run_dir: Path, seed: int, rng: random.Random, steps: int = STEPS) -> None:
    """What `semroute train` + `semroute eval --data` leave in a run directory, with made-up scores."""
    run_dir.mkdir(parents=True)
    per_prompt = {m: [float(rng.random() < 0.3) for _ in PROMPTS] for m in ("top1", "top5", "attribute")}
    result = {
        "prompts": PROMPTS,
        "sampling": {"steps": EVAL_STEPS, "guidance_scale": 3.0, "shift": 1.0},
        "fd": 200 + 10 * rng.random(),
        **{m: sum(v) / len(v) for m, v in per_prompt.items()},
        "per_prompt": per_prompt,
        "chance": {"top1": 0.1, "top5": 0.5, "attribute": 0.2},
        "ceiling": {"fd": 100.0, "top1": 0.7, "top5": 0.9, "attribute": 0.6},
        "real_split_half_fd": 70.0,
    }
    (run_dir / "realbench.json").write_text(json.dumps(result))
    (run_dir / "summary.json").write_text(
        json.dumps({"steps": steps, "images_per_s": 50 + seed, "cpu_capability": "AVX512"})
    )
    (run_dir / "run_config.yaml").write_text(f"train:\n  seed: {seed}\n")
    (run_dir / "checkpoints").mkdir()  # never carried


def _main(module, monkeypatch, work: Path, out: Path, data: Path, steps: int = STEPS) -> None:
    argv = ["real_images.py", "--data", str(data), "--vae", str(data), "--work", str(work), "--out", str(out)]
    argv += ["--rows", ",".join(ROWS), "--seeds", str(SEEDS), "--steps", str(steps)]
    monkeypatch.setattr(sys, "argv", [*argv, "--eval-steps", str(EVAL_STEPS)])
    module.main()


def test_records_under_out_finish_the_comparison_with_an_empty_work_dir(real_images, tmp_path, monkeypatch):
    data = _data_set(tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"
    rng = random.Random(0)
    for row in ROWS:
        for seed in range(SEEDS):
            _scored_run(work / "runs" / f"{row}-seed{seed}", seed, rng)
        real_images.save_column(
            torch.rand(len(PROMPTS), 3, 8, 8), work / "runs" / f"{row}-seed0" / "grid.png"
        )

    def no_subprocess(command, log):
        raise AssertionError(f"ran {command}: every run was finished")

    monkeypatch.setattr(real_images, "run", no_subprocess)
    _main(real_images, monkeypatch, work, out, data)
    table = (out / "table.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert (out / "samples.png").is_file() and "b2 - b1, top1" in table
    for row in ROWS:
        for seed in range(SEEDS):
            carried = out / "runs" / f"{row}-seed{seed}"
            assert {p.name for p in carried.iterdir()} == {
                "realbench.json",
                "summary.json",
                "run_config.yaml",
            } | ({"grid.png"} if seed == 0 else set())
    # Another machine: nothing in WORK, the records under OUT. Nothing trains; the table is the same.
    (out / "samples.png").unlink()
    fresh = tmp_path / "fresh-work"
    _main(real_images, monkeypatch, fresh, out, data)
    assert (out / "table.md").read_text() == table
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == results["rows"] and again["claims"] == results["claims"]
    assert (out / "samples.png").is_file()  # drawn from the carried grid columns, without checkpoints
    assert not (fresh / "runs" / "b1-seed0" / "checkpoints").exists()
    # A run already scored in WORK is not overwritten by the records.
    (fresh / "runs" / "b1-seed1" / "realbench.json").write_text("kept")
    assert real_images.carry_in(out, fresh) == []
    assert (fresh / "runs" / "b1-seed1" / "realbench.json").read_text() == "kept"


def test_records_of_another_budget_are_refused_before_anything_trains(real_images, tmp_path, monkeypatch):
    data = _data_set(tmp_path)
    out = tmp_path / "out"
    _scored_run(out / "runs" / "b1-seed0", 0, random.Random(1), steps=STEPS // 2)
    calls = []
    monkeypatch.setattr(real_images, "run", lambda command, log: calls.append(command))
    with pytest.raises(ValueError, match=f"trained {STEPS // 2} steps, not --steps {STEPS}"):
        _main(real_images, monkeypatch, tmp_path / "work", out, data)
    assert calls == []
    assert (out / "runs" / "b1-seed0" / "realbench.json").is_file()  # the records are kept
