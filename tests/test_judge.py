"""The image judge (a pretrained ImageNet network) and the real-image metrics: load check, formulas against
references computed another way, chance and ceiling levels."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from skimage import data

from semroute.bench.image_metrics import (
    attribute_hits,
    frechet_distance,
    retrieval,
    sibling_groups,
    split_half_fd,
)
from semroute.bench.judge import FEATURE_DIM, ImageJudge

# ImageNet-1k indices of what the sample photos show (class names from the ImageNet synset list).
ESPRESSO_CUP_MUG = {967, 968, 504}  # espresso, cup, coffee mug
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
MISSILES = {657, 744, 812}  # missile, projectile, space shuttle
PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "colorwheel",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
    "brick",
    "camera",
    "clock",
    "coins",
]


def photo(name: str, size: int = 96, crop: float = 1.0, corner: int = 0) -> torch.Tensor:
    """A scikit-image sample photo (shipped in its wheel) as (3, size, size) in [0, 1]: the centred square,
    or the `crop` share of it at one of its four corners."""
    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    x = torch.from_numpy(array[..., :3].astype(np.float32) / 255).permute(2, 0, 1)
    side = min(x.shape[1:])
    top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
    part = round(side * crop)
    top += (side - part) * (corner // 2)
    left += (side - part) * (corner % 2)
    x = x[None, :, top : top + part, left : left + part]
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0].clamp(0, 1)


@pytest.fixture(scope="module")
def judge() -> ImageJudge:
    return ImageJudge()


@pytest.fixture(scope="module")
def real(judge) -> torch.Tensor:
    """Features of 48 real images: two opposite corner crops of each sample photo and their mirror images."""
    images = torch.stack([photo(n, crop=0.8, corner=c) for n in PHOTOS for c in (0, 3)])
    return judge.features(torch.cat([images, images.flip(-1)]))


def test_the_judge_classifies_sample_photos_as_imagenet_would(judge):
    """A wrong load (random weights, keys on the wrong layers, wrong normalisation) fails here."""
    images = torch.stack([photo(n, 224) for n in ("coffee", "chelsea", "rocket", "astronaut")])
    top5 = judge.logits(images).topk(5).indices.tolist()
    assert top5[0][0] in ESPRESSO_CUP_MUG
    assert top5[1][0] in CATS
    assert top5[2][0] in MISSILES
    # The astronaut is none of the other photos' things.
    assert not set(top5[3]) & (ESPRESSO_CUP_MUG | CATS | MISSILES)


def test_features_are_pooled_penultimate_activations(judge):
    images = torch.stack([photo("coffee"), photo("chelsea")])
    features = judge.features(images)
    assert features.shape == (2, FEATURE_DIM) and features.dtype == torch.float64
    # The classifier applied to the pooled features gives the network's own logits.
    fc = judge.model._fc
    logits = features.float() @ fc.weight.T + fc.bias
    torch.testing.assert_close(logits, judge.logits(images), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        judge.features(torch.zeros(2, 1, 8, 8))


def test_frechet_distance_against_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(40, 6)))
    b = torch.from_numpy(rng.normal(loc=0.5, scale=1.5, size=(50, 6)))
    x, y = a.numpy(), b.numpy()
    cov_a, cov_b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    reference = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(
        cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real
    )
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # Fewer images than features (the nuclear-norm branch): the same value as the covariance formula.
    wide_a = torch.from_numpy(rng.normal(size=(5, 12)))
    wide_b = torch.from_numpy(rng.normal(loc=0.3, size=(7, 12)))
    u, v = wide_a.numpy(), wide_b.numpy()
    ca, cb = np.cov(u, rowvar=False), np.cov(v, rowvar=False)
    w, q = np.linalg.eigh(ca)
    root = (q * np.sqrt(w.clip(min=0))) @ q.T
    cross = np.sqrt(np.linalg.eigvalsh(root @ cb @ root).clip(min=0)).sum()
    wide_reference = ((u.mean(0) - v.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross
    assert frechet_distance(wide_a, wide_b) == pytest.approx(wide_reference, rel=1e-6)
    # Two Gaussians with known parameters: the closed form for diagonal covariances.
    big = 200_000
    p = torch.from_numpy(rng.normal(0.0, 1.0, size=(big, 2)))
    q = torch.from_numpy(rng.normal(1.0, 2.0, size=(big, 2)))
    assert frechet_distance(p, q) == pytest.approx(2 * 1.0 + 2 * (1 + 4 - 2 * 2), rel=0.02)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(a[:1], b)


def test_real_images_score_the_ceiling(real):
    """Generated images identical to the real ones: every retrieval hits and FD is zero."""
    assert retrieval(real, real, k=1).all() and retrieval(real, real, k=5).all()
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    groups = [[0, 1, 2]] * 3 + [[3, 4]] * 2 + [[5, 6, 7, 8]] * 4
    hits, chance = attribute_hits(real[:9], real, groups, list(range(9)))
    assert hits.all() and chance == pytest.approx((3 * (1 / 3) + 2 * (1 / 2) + 4 * (1 / 4)) / 9)


def test_noise_and_grey_images_score_chance_and_far_from_real(judge, real):
    n = len(real)
    floor = split_half_fd(real)
    generator = torch.Generator().manual_seed(0)
    noise = judge.features(torch.rand(n, 3, 96, 96, generator=generator))
    grey = judge.features(torch.full((n, 3, 96, 96), 0.5))
    for fake in (noise, grey):
        # Chance of top-1 is 1/N: with ties counted against a hit, identical features hit exactly once.
        assert retrieval(fake, real, k=1).float().mean() <= 2 / n
        assert retrieval(fake, real, k=5).float().mean() <= 10 / n
        groups = [list(range(0, 8))] * 8 + [list(range(8, 16))] * 8
        hits, chance = attribute_hits(fake[:16], real, groups, list(range(16)))
        assert chance == pytest.approx(1 / 8) and hits.float().mean() <= 2 * chance
        # Far from the real images: several times the real-vs-real floor.
        assert frechet_distance(fake, real) > 3 * floor
    assert retrieval(grey, real, k=1).sum() == 1  # one real image is the nearest of the one grey feature


def test_retrieval_counts_ranks_and_ties():
    real = torch.eye(4, dtype=torch.float64)
    generated = torch.tensor([[1, 0, 0, 0], [1, 0.9, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.float64)
    # Image 1 is nearest real 0 (rank 2), image 2 ties reals 2 and 3 (a tie is a miss at k=1).
    assert retrieval(generated, real, k=1).tolist() == [True, False, False, True]
    assert retrieval(generated, real, k=2).tolist() == [True, True, True, True]
    with pytest.raises(ValueError, match="must pair up"):
        retrieval(generated[:3], real)
    with pytest.raises(ValueError, match="at least 2 real images, its target 0 among them"):
        attribute_hits(generated[:1], real, [[0]], [0])
    with pytest.raises(ValueError, match="its target 3 among them"):
        attribute_hits(generated[:1], real, [[0, 1]], [3])
    with pytest.raises(ValueError, match="needs candidates and a target"):
        attribute_hits(generated, real, [[0, 1]], [0])


def test_attribute_hits_pick_the_own_image_among_siblings_only():
    """A generated image that matches another emoji best, but its own tone best among its siblings, hits."""
    bank = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.7, 0.7], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    generated = torch.tensor([[0.9, 0.3, 0.1], [0.0, 0.2, 1.0]], dtype=torch.float64)
    # Image 0: nearest overall is bank 0, but among its siblings {1, 2} it is nearest to 1, its own.
    # Image 1: its siblings are {1, 2} and its own is 1, but it is nearer to 2: a miss.
    hits, chance = attribute_hits(generated, bank, [[1, 2], [1, 2]], [1, 1])
    assert hits.tolist() == [True, False] and chance == pytest.approx(0.5)
    rows = [{"base": "ninja"}, {"base": "ninja"}, {"base": "flag: France"}, {"base": "ninja"}]
    assert sibling_groups(rows) == [[0, 1, 3], [0, 1, 3], [2], [0, 1, 3]]
