import json

import numpy as np
import pytest
import torch

from semroute.bench import BENCH_VERSION, CATEGORIES, bench_prompts, run_bench
from semroute.bench.shapesbench import summarize
from semroute.data.shapes import Group, Scene, ShapesConfig, ShapesTask, parse_caption


class FakePipeline:
    """What the benches need of a pipeline besides `generate`: its default sampling settings."""

    def sampling(self, steps=None, guidance_scale=None, shift=None):
        from semroute.flow import SampleConfig

        return SampleConfig(steps=steps or 2, guidance_scale=guidance_scale or 3.0, shift=shift or 1.0)


class RenderingPipeline(FakePipeline):
    """A 'model' that draws exactly what it is asked (optionally with a defect) by rendering the scene."""

    def __init__(self, task, defect=None):
        self.task = task
        self.defect = defect

    def generate(self, prompts, num_steps, guidance_scale, shift, seed, on_step=None):
        images = []
        for prompt, s in zip(prompts, seed, strict=True):
            scene = parse_caption(prompt)
            if self.defect == "miscount":
                g = scene.groups[0]
                wrong = g.count + 1 if g.count < 4 else g.count - 1
                scene = Scene((Group(wrong, g.colour, g.shape),) + scene.groups[1:])
            elif self.defect == "flip_relation" and scene.relation:
                opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
                scene = Scene(scene.groups, opposite[scene.relation])
            images.append(torch.from_numpy(self.task.render(scene, np.random.default_rng(s))))
        return torch.stack(images)


class NoisePipeline(FakePipeline):
    """A 'model' that has learned nothing: uniform random noise in [0, 1], or noise dimmed to look sparse."""

    def __init__(self, size=16, scale=1.0):
        self.size, self.scale = size, scale

    def generate(self, prompts, num_steps, guidance_scale, shift, seed, on_step=None):
        return torch.stack(
            [
                self.scale * torch.rand(3, self.size, self.size, generator=torch.Generator().manual_seed(s))
                for s in seed
            ]
        )


def test_prompt_set_is_fixed_and_covers_every_category():
    config = ShapesConfig()
    prompts = bench_prompts(config)
    assert prompts == bench_prompts(ShapesConfig())
    counts = {c: sum(p.category == c for p in prompts) for c in CATEGORIES}
    assert counts == {"counting": 12, "colour": 12, "two_objects": 12, "position": 12}
    assert len({p.text for p in prompts}) == len(prompts)
    for p in prompts:
        assert parse_caption(p.text) == p.scene
    assert all(p.scene.relation for p in prompts if p.category == "position")


def test_excluding_bench_prompts_removes_them_from_training():
    config = ShapesConfig(two_object_fraction=0.3, position_fraction=0.3, exclude_bench_prompts=True)
    task = ShapesTask(config)
    training = set(task.training_scenes())
    held = {p.scene for p in bench_prompts(config)}
    assert not training & held
    rng = np.random.default_rng(0)
    assert not {task.draw_scene(rng) for _ in range(3000)} & held
    assert ShapesTask(
        ShapesConfig(two_object_fraction=0.3, position_fraction=0.3)
    ).training_scenes().__len__() == len(training) + len(held)


def test_a_perfect_model_scores_100_percent():
    config = ShapesConfig()
    results = run_bench(
        RenderingPipeline(ShapesTask(config)), bench_prompts(config), images_per_prompt=2, progress=False
    )
    assert results["version"] == BENCH_VERSION
    assert results["categories"] == {c: 1.0 for c in CATEGORIES}
    assert results["overall"] == 1.0 and results["fidelity"] == 1.0
    # Scoring is cheap next to sampling; here "sampling" is rendering, so only check it is measured.
    assert results["timing"]["scoring_s"] > 0


@pytest.mark.parametrize("scale", [1.0, 0.45])
def test_noise_scores_zero_in_every_category(scale):
    # Full noise is one big blob; dimmed noise (0.45) breaks into many small blobs of random colour.
    config = ShapesConfig()
    results = run_bench(
        NoisePipeline(scale=scale), bench_prompts(config), images_per_prompt=4, progress=False
    )
    assert results["categories"] == {c: 0.0 for c in CATEGORIES}
    assert results["overall"] == 0.0 and results["fidelity"] < 0.05


@pytest.mark.parametrize(
    "defect, failing",
    [("miscount", {"counting", "colour", "two_objects", "position"}), ("flip_relation", {"position"})],
)
def test_defects_fail_exactly_their_categories(defect, failing):
    config = ShapesConfig()
    results = run_bench(
        RenderingPipeline(ShapesTask(config), defect), bench_prompts(config), 2, progress=False
    )
    for category, accuracy in results["categories"].items():
        if category in failing:
            assert accuracy < 0.2, category
        else:
            assert accuracy == 1.0, category


def test_summary_of_a_fixed_result():
    per_prompt = [
        {"category": "counting", "correct": [True, False]},
        {"category": "counting", "correct": [True, True]},
        {"category": "colour", "correct": [False, False]},
        {"category": "position", "correct": [True, True]},
    ]
    summary = summarize(per_prompt, clean=3, blobs=4)
    assert summary["categories"] == {"counting": 0.75, "colour": 0.0, "position": 1.0}
    assert summary["overall"] == pytest.approx(1.75 / 3)
    assert summary["fidelity"] == 0.75


def test_per_image_seeds_do_not_depend_on_the_batch(tiny_encoder):
    from .test_pipeline import make_pipeline

    pipe = make_pipeline(tiny_encoder, "depth")
    batch = pipe.generate(["two red circles", "one blue square"], 3, 2.0, seed=[11, 12])
    alone = pipe.generate(["one blue square"], 3, 2.0, seed=[12])
    torch.testing.assert_close(batch[1], alone[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        pipe.generate(["one blue square"], 3, 2.0, seed=[1, 2])


def test_cli_eval_writes_results(tiny_llama_dir, tmp_path):
    import yaml

    from semroute.cli import main

    from .conftest import tiny_run_config

    config = tiny_run_config(tiny_llama_dir)
    config["data"].update(two_object_fraction=0.2, position_fraction=0.2, exclude_bench_prompts=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--max-steps", "2"]) == 0
    out = tmp_path / "bench.json"
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "run"), "--n", "1", "--steps", "2", "--out", str(out)])
        == 0
    )
    results = json.loads(out.read_text())
    assert set(results["categories"]) == set(CATEGORIES)
    assert 0 <= results["overall"] <= 1 and 0 <= results["fidelity"] <= 1
    assert all(len(p["correct"]) == 1 for p in results["prompts"])
