"""The real-image benchmark (`semroute eval --data`): sibling groups, scores against references with a known
answer (own features: the ceiling; deranged features: zero), and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semroute.bench.realbench import one_attribute_siblings, score_images
from semroute.cli import main
from semroute.config import load_config
from semroute.train import train

from .conftest import tiny_run_config


def test_siblings_differ_in_exactly_one_attribute():
    rows = [
        {"text": "ninja", "base": "ninja"},
        {"text": "ninja: dark skin tone", "base": "ninja"},
        {"text": "ninja: light skin tone", "base": "ninja"},
        {"text": "family: man, man, girl", "base": "family: man, man, girl"},
        {"text": "family: man, man, boy", "base": "family: man, man, boy"},
        {"text": "family: man, woman, boy", "base": "family: man, woman, boy"},
        {"text": "family: woman, girl", "base": "family: woman, girl"},
        {"text": "red apple", "base": "red apple"},
    ]
    groups = one_attribute_siblings(rows)
    assert groups[0] == groups[1] == [0, 1, 2]
    assert groups[3] == [3, 4]  # man,man,boy differs in one member; man,woman,boy in two
    assert groups[4] == [3, 4, 5] and groups[5] == [4, 5]
    assert groups[6] == [6] and groups[7] == [7]  # no caption differs from these in one attribute


def _groups(count: int, size: int) -> list[list[int]]:
    """Consecutive blocks of `size` as sibling groups, each row's own index first."""
    out = []
    for i in range(count):
        block = list(range(i - i % size, i - i % size + size))
        out.append([i] + [j for j in block if j != i])
    return out


def test_own_features_score_the_ceiling_and_deranged_ones_score_zero():
    real = torch.randn(40, 64, dtype=torch.float64)
    groups = _groups(40, 4)
    ceiling = score_images(real.clone(), real, real, groups, 1)
    assert ceiling["top1"] == ceiling["top5"] == ceiling["attribute"] == 1.0
    assert ceiling["fd"] == pytest.approx(0.0, abs=1e-6)
    assert ceiling["chance"] == {"top1": 1 / 40, "top5": 5 / 40, "attribute": 0.25}
    # Image i shows what caption i+1 asked for (within its group of 4): never its own, always a sibling's.
    shifted = torch.tensor([i - i % 4 + (i + 1) % 4 for i in range(40)])
    wrong = score_images(real[shifted], real, real, groups, 1)
    assert wrong["top1"] == 0.0 and wrong["attribute"] == 0.0
    assert wrong["fd"] == pytest.approx(0.0, abs=1e-6)  # the same set of images: FD cannot tell
    # Two images per prompt: one right and one wrong scores a half.
    paired = torch.stack([real, real[shifted]], 1).reshape(80, 64)
    assert score_images(paired, real, real, groups, 2)["top1"] == 0.5


def test_noise_scores_near_chance():
    real = torch.randn(200, 32, dtype=torch.float64)
    noise = torch.randn(200, 32, dtype=torch.float64)
    scores = score_images(noise, real, real, _groups(200, 5), 1)
    assert scores["top1"] <= 0.03 and scores["top5"] <= 0.08  # chance 0.005 and 0.025
    assert 0.05 < scores["attribute"] < 0.4  # chance 0.2
    with pytest.raises(ValueError, match="expected 2 generated images for each of 200 prompts"):
        score_images(noise, real, real, _groups(200, 5), 2)


def write_set(root: Path, held: int = 8, train: int = 8) -> Path:
    """A set in the layout `semroute data` writes: coloured squares, toned siblings across the split."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for name, count in (("heldout", held), ("train", train)):
        rows = []
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / "images" / f"{name}{i}.png"
            )
            tone = ("light", "dark")[name == "heldout"]
            rows.append(
                {
                    "image": f"images/{name}{i}.png",
                    "text": f"thing {i}: {tone} skin tone",
                    "base": f"thing {i}",
                }
            )
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_eval_data_samples_the_held_out_captions_and_scores_them(
    tiny_llama_dir, tiny_encoder, tmp_path, capsys
):
    config = load_config(tiny_run_config(tiny_llama_dir, max_steps=10))
    run = tmp_path / "run"
    train(config, run, progress=False, encoder=tiny_encoder)
    data = write_set(tmp_path / "set")
    out = tmp_path / "real.json"
    args = ["eval", "--checkpoint", str(run), "--data", str(data), "--out", str(out), "--steps", "2"]
    assert main([*args, "--n", "2"]) in (None, 0)
    result = json.loads(out.read_text())
    assert result["prompts"][0] == "thing 0: dark skin tone" and len(result["per_prompt"]["top1"]) == 8
    assert result["chance"] == {"top1": 1 / 8, "top5": 5 / 8, "attribute": 0.5}
    assert result["attribute_prompts"] == 8  # each held-out caption has its light-toned sibling in training
    # Pixel space: the ceiling is the real images themselves.
    assert result["ceiling"]["top1"] == result["ceiling"]["attribute"] == 1.0
    assert 0 <= result["top1"] <= 1 and result["fd"] >= 0
    assert Image.open(out.with_suffix(".png")).size[0] > 100
    assert "attribute" in capsys.readouterr().out
    # The same file with other settings is never overwritten.
    assert main([*args, "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert "images_per_prompt differ); pass another --out" in err and "sampling held-out" not in err
    assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path)]) == 2
    assert "written by `semroute data emoji" in capsys.readouterr().err
