import numpy as np
import pytest
import torch

from semroute.bench.scoring import detect_objects, fidelity_counts, score
from semroute.data.shapes import (
    COLOURS,
    Group,
    Scene,
    ShapesConfig,
    ShapesDataset,
    ShapesTask,
    caption,
    parse_caption,
)


@pytest.fixture(scope="module")
def task():
    return ShapesTask(ShapesConfig(two_object_fraction=0.3, position_fraction=0.3))


def renders(task, n, seed=0):
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = task.draw_scene(rng)
        yield scene, task.render(scene, rng)


def test_scorer_is_exact_on_clean_renders(task):
    results = [score(image, scene) for scene, image in renders(task, 400)]
    assert all(all(r.values()) for r in results)
    assert any(len(scene.groups) == 2 for scene, _ in renders(task, 50))
    assert any(scene.relation for scene, _ in renders(task, 50))


def test_clean_renders_are_clean_objects(task):
    for scene, image in renders(task, 100, seed=1):
        objects = detect_objects(image)
        assert len(objects) == scene.total
        assert all(o.clean for o in objects)


def test_scorer_is_robust_to_noise_and_blur(task):
    g = torch.Generator().manual_seed(0)
    ok = 0
    total = 0
    for scene, image in renders(task, 200, seed=2):
        x = torch.from_numpy(image)
        # dimmer, slightly blurred edges and noise, like samples of a half-trained model
        blurred = 0.85 * x + 0.05 * torch.nn.functional.avg_pool2d(x[None], 3, 1, 1)[0]
        noisy = (blurred + 0.06 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        ok += all(score(noisy, scene).values())
        total += 1
    assert ok / total > 0.97


def test_known_defects_are_scored_wrong(task):
    rng = np.random.default_rng(0)
    scene = Scene((Group(3, "red", "circle"),))
    fewer = task.render(Scene((Group(2, "red", "circle"),)), rng)
    r = score(fewer, scene)
    assert not r["count"] and not r["exact"] and r["colour"] and r["shape"]
    recoloured = task.render(Scene((Group(3, "blue", "circle"),)), rng)
    r = score(recoloured, scene)
    assert r["count"] and not r["colour"] and not r["exact"]
    reshaped = task.render(Scene((Group(3, "red", "triangle"),)), rng)
    r = score(reshaped, scene)
    assert r["count"] and r["colour"] and not r["shape"]
    swapped = task.render(Scene((Group(1, "red", "circle"), Group(2, "blue", "square"))), rng)
    r = score(swapped, Scene((Group(2, "red", "circle"), Group(1, "blue", "square"))))
    assert r["count"] and not r["exact"]
    assert not score(np.zeros((3, 16, 16), dtype=np.float32), scene)["colour"]


def test_a_malformed_object_fails_every_check(task):
    scene = Scene((Group(2, "red", "square"),))
    image = task.render(scene, np.random.default_rng(0))
    assert all(score(image, scene).values())
    ys, xs = np.nonzero(image[0])
    image[0, ys[0], xs[0]] = 0.0  # one corner pixel missing: no longer a clean square
    assert not any(score(image, scene).values())


@pytest.mark.parametrize("scale", [1.0, 0.45])
def test_demo_metrics_give_noise_zero_and_renders_one(task, scale):
    from semroute.bench.scoring import accuracy

    scenes = ShapesTask().single_scenes
    g = torch.Generator().manual_seed(0)
    noise = scale * torch.rand(len(scenes) * 4, 3, 16, 16, generator=g)
    result = accuracy(noise, scenes, 4)
    for key in ("count_accuracy", "colour_accuracy", "shape_accuracy", "exact_accuracy"):
        assert result[key] == 0.0, key
    assert set(result["count_accuracy_by_n"].values()) == {0.0}
    rng = np.random.default_rng(1)
    renders = torch.stack([torch.from_numpy(task.render(s, rng)) for s in scenes for _ in range(4)])
    perfect = accuracy(renders, scenes, 4)
    for key in ("count_accuracy", "colour_accuracy", "shape_accuracy", "exact_accuracy"):
        assert perfect[key] == 1.0, key


def test_specks_are_not_objects():
    image = np.zeros((3, 16, 16), dtype=np.float32)
    image[:, 2, 2] = 1.0
    image[:, 8, 8:10] = 1.0
    assert detect_objects(image) == []


def test_rendering_is_deterministic_by_seed(task):
    ds_a, ds_b = ShapesDataset(task, seed=3), ShapesDataset(task, seed=3)
    for i in range(20):
        xa, ca = ds_a[i]
        xb, cb = ds_b[i]
        assert ca == cb and torch.equal(xa, xb)
    assert not torch.equal(ShapesDataset(task, seed=4)[0][0], ds_a[0][0])
    x, _ = ds_a[0]
    assert x.shape == (3, 16, 16) and x.min() == -1 and x.max() == 1


def test_captions_round_trip(task):
    for scene in task.single_scenes + task.two_object_scenes[:100] + task.position_scenes[:100]:
        assert parse_caption(caption(scene)) == scene
    assert (
        caption(Scene((Group(2, "red", "circle"), Group(1, "blue", "square"))))
        == "two red circles and one blue square"
    )
    with pytest.raises(ValueError, match="cannot read"):
        parse_caption("seven pink hexagons")


def test_vocabulary_is_validated():
    with pytest.raises(ValueError, match="data.colours must list some of"):
        ShapesConfig(colours=["red", "teal"])
    with pytest.raises(ValueError, match="data.counts"):
        ShapesConfig(counts=[0, 1])
    assert len(ShapesTask().single_scenes) == 4 * len(COLOURS) * 3


def test_relations_render_and_score(task):
    rng = np.random.default_rng(5)
    red_circle, blue_square = Group(1, "red", "circle"), Group(1, "blue", "square")
    for relation, opposite in (("left of", "right of"), ("above", "below")):
        scene = Scene((red_circle, blue_square), relation)
        image = task.render(scene, rng)
        assert score(image, scene)["exact"]
        wrong = Scene((red_circle, blue_square), opposite)
        r = score(image, wrong)
        assert r["count"] and r["colour"] and r["shape"] and not r["exact"]
        # The same relation read from the other object is the opposite relation.
        assert score(image, Scene((blue_square, red_circle), opposite))["exact"]
    assert caption(Scene((red_circle, blue_square), "above")) == "a red circle above a blue square"
    with pytest.raises(ValueError, match="two single objects"):
        Scene((Group(2, "red", "circle"), blue_square), "above")
    with pytest.raises(ValueError, match="unknown relation"):
        Scene((red_circle, blue_square), "behind")


def test_fidelity_counts_specks_and_clean_objects(task):
    image = task.render(Scene((Group(2, "green", "triangle"),)), np.random.default_rng(0))
    assert fidelity_counts(image) == (2, 2)
    drawn = np.zeros((3, 16, 16), dtype=np.float32)
    drawn[0, 2:5, 2:5] = 1.0  # a clean red square
    drawn[0, 12, 12] = 1.0  # a speck
    drawn[2, 11:13, 2:4] = 1.0  # a 2x2 blob: no known shape
    drawn[:, 7:10, 10:13] = 0.5  # a square of grey: no palette colour
    assert fidelity_counts(drawn) == (1, 4)
