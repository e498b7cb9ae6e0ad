"""The demo: a step budget (the same result on every machine),
an ETA, and a verdict that never passes noise off as a result."""

from __future__ import annotations

import json

import pytest
import yaml

from semroute.base import NOT_LEARNED_EXIT, packaged_config
from semroute.cli import main
from semroute.config import load_config
from semroute.demo import judge

from .conftest import tiny_run_config


def test_the_packaged_demo_is_a_step_budget_with_frequent_checkpoints():
    config = load_config(packaged_config("demo.yaml"))
    t = config.train
    # Steps, not minutes; and no more images than the budget the README's demo table measured.
    assert t.minutes is None and t.max_steps * t.batch_size <= 3200 * 32
    assert t.mixed_precision == "auto"
    assert t.checkpoint_every <= t.max_steps // 4  # a killed demo loses little; re-running resumes


def test_an_untrained_demo_says_so_and_exits_4(tiny_llama_dir, tmp_path):
    raw = tiny_run_config(tiny_llama_dir, "depth", max_steps=6)
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "demo"
    assert (
        main(["demo", "--config", str(cfg), "--out", str(out), "--precision", "fp32", "--device", "cpu"])
        == NOT_LEARNED_EXIT
    )
    metrics = json.loads((out / "metrics.json").read_text())
    # The budget is the config's step count, whatever the machine's speed.
    assert metrics["steps"] == metrics["recipe_steps"] == 6
    # 2 counts x 2 colours x 2 shapes, 2 each
    assert metrics["strategy"] == "depth" and metrics["images"] == 8 * 2
    assert metrics["verdict"] == "not learned"
    assert metrics["precision"]["name"] == "fp32" and metrics["device"] == "cpu" and metrics["cpu_capability"]
    text = "\n".join(metrics["verdict_text"])
    assert "chance 50%" in text and "N=1:" in text and "N=2:" in text
    for name in ("samples.png", "routing.png"):
        assert (out / name).stat().st_size > 1000
    # A time box cut short is named as the cause, with the command that fixes it; the run resumes.
    assert (
        main(
            [
                "demo",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "boxed"),
                "--precision",
                "fp32",
                "--max-steps",
                "2",
            ]
        )
        == NOT_LEARNED_EXIT
    )
    boxed = json.loads((tmp_path / "boxed" / "metrics.json").read_text())
    assert boxed["steps"] == 2 and boxed["recipe_steps"] == 6
    assert any("only 2 of the recipe's 6 steps" in line for line in boxed["verdict_text"])


def metrics(counting, by_n, clean=0.9, images=288, loss=0.1):
    return {
        "count_accuracy": counting,
        "count_accuracy_by_n": by_n,
        "clean_accuracy": clean,
        "images": images,
        "final_loss": loss,
    }


def test_verdicts_against_chance_per_count():
    counts = [1, 2, 3, 4]
    learned = judge(metrics(0.66, {"1": 0.95, "2": 0.7, "3": 0.55, "4": 0.44}), counts, 800, 800)
    assert learned.level == "learned" and learned.learned
    assert "chance 25%" in learned.lines[0] and not any("not above chance" in line for line in learned.lines)
    partly = judge(metrics(0.45, {"1": 0.9, "2": 0.4, "3": 0.3, "4": 0.2}), counts, 800, 800)
    assert partly.level == "partly learned" and partly.learned
    assert sum("not above chance" in line for line in partly.lines) == 2  # N=3 (30% of 72) and N=4
    noise = judge(metrics(0.0, dict.fromkeys("1234", 0.0), clean=0.0), counts, 800, 800)
    assert noise.level == "not learned" and not noise.learned
    assert "has not learned to draw" in noise.text() and "NOT a result" in noise.text()
    ignores_count = judge(metrics(0.26, dict.fromkeys("1234", 0.26), clean=0.9), counts, 800, 800)
    assert ignores_count.level == "not learned" and "ignores the prompt" in ignores_count.text()
    diverged = judge(metrics(0.0, dict.fromkeys("1234", 0.0), loss=float("nan")), counts, 800, 800)
    assert "diverged" in diverged.text()
    # Twice chance is the line between partly learned and learned; with two counts chance is 50%.
    assert judge(metrics(0.49, {"1": 0.9, "2": 0.08}), [1, 2], 10, 10).level == "not learned"
    assert judge(metrics(0.62, {"1": 0.9, "2": 0.34}), [1, 2], 10, 10).level == "partly learned"
    assert judge(metrics(0.5, {"1": 0.6, "2": 0.4}), counts, 10, 10).level == "learned"


def test_training_reports_its_pace_once(tiny_llama_dir, tmp_path):
    from semroute.train import train

    seen = []
    config = load_config(tiny_run_config(tiny_llama_dir, max_steps=16, checkpoint_every=100))
    train(
        config, tmp_path / "run", progress=False, on_pace=lambda per_step, left: seen.append((per_step, left))
    )
    assert len(seen) == 1
    per_step, left = seen[0]
    assert per_step > 0 and left == pytest.approx(per_step * (16 - 12))
