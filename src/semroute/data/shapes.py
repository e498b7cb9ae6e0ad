"""Procedural coloured-shape scenes: captions, a deterministic renderer, and the held-out evaluation split.

Scenes are tiny (16x16 by default) so that a DiT learns whole objects on a CPU in minutes:
a 3x3 square, a 4x4 circle with cut corners and a 5x3 triangle, at least 1 px apart on black.
The scorer that reads images back is `bench/scoring.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from itertools import combinations, permutations, product

import numpy as np
import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES: dict[str, np.ndarray] = {
    "square": np.ones((3, 3), dtype=bool),
    "circle": np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=bool),
    "triangle": np.array([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class Group:
    """`count` objects of one colour and shape."""

    count: int
    colour: str
    shape: str

    def text(self) -> str:
        return f"{NUMBERS[self.count]} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"


RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Scene:
    """What a caption asks for: groups of objects, or two single objects in a spatial relation."""

    groups: tuple[Group, ...]
    relation: str | None = None  # "left of" etc.: groups[0] <relation> groups[1]

    def __post_init__(self) -> None:
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; valid: {', '.join(RELATIONS)}")
            if len(self.groups) != 2 or any(g.count != 1 for g in self.groups):
                raise ValueError("a relation needs exactly two single objects")
            a, b = self.groups
            if (a.colour, a.shape) == (b.colour, b.shape):
                raise ValueError("a relation needs two objects that differ in colour or shape")

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)


def caption(scene: Scene) -> str:
    """ "two red circles and one blue square", or "a red circle left of a blue square"."""
    if scene.relation is not None:
        a, b = scene.groups
        return f"a {a.colour} {a.shape} {scene.relation} a {b.colour} {b.shape}"
    return " and ".join(g.text() for g in scene.groups)


_GROUP_RE = re.compile(r"^(\w+) (\w+) (\w+?)s?$")
_RELATION_RE = re.compile(r"^a (\w+) (\w+) (" + "|".join(RELATIONS) + r") a (\w+) (\w+)$")


def _vocabulary_error(part: str) -> ValueError:
    return ValueError(
        f"cannot read {part!r} as '<count> <colour> <shape>' or 'a <colour> <shape> <relation> a <colour> "
        f"<shape>'; counts {', '.join(NUMBERS[1:])}, colours {', '.join(COLOURS)}, shapes "
        f"{', '.join(SHAPES)}, relations {', '.join(RELATIONS)}"
    )


def parse_caption(text: str) -> Scene:
    """Inverse of `caption`; raises ValueError naming the part it cannot read."""
    text = text.strip().lower()
    m = _RELATION_RE.match(text)
    if m:
        if m[1] not in COLOURS or m[2] not in SHAPES or m[4] not in COLOURS or m[5] not in SHAPES:
            raise _vocabulary_error(text)
        return Scene((Group(1, m[1], m[2]), Group(1, m[4], m[5])), m[3])
    groups = []
    for part in text.split(" and "):
        m = _GROUP_RE.match(part.strip())
        if not m or m[1] not in NUMBERS or m[2] not in COLOURS or m[3] not in SHAPES:
            raise _vocabulary_error(part)
        groups.append(Group(NUMBERS.index(m[1]), m[2], m[3]))
    return Scene(tuple(groups))


@dataclass
class ShapesConfig:
    """What scenes the task draws: sizes, vocabulary and the share of two-object prompts."""

    image_size: int = 16
    counts: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    colours: list[str] = field(default_factory=lambda: list(COLOURS))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    # Fraction of training scenes with two kinds of object ("two red circles and one blue square").
    two_object_fraction: float = 0.0
    # Largest total object count in a two-object scene.
    two_object_max_total: int = 3
    # Fraction of training scenes with two objects in a relation ("a red circle left of a blue square").
    position_fraction: float = 0.0
    # Never train on the ShapesBench prompts, so that the benchmark measures held-out compositions.
    exclude_bench_prompts: bool = False

    def __post_init__(self) -> None:
        for name, values, valid in (("colours", self.colours, COLOURS), ("shapes", self.shapes, SHAPES)):
            unknown = [v for v in values if v not in valid]
            if unknown or not values:
                raise ValueError(f"data.{name} must list some of {', '.join(valid)}, got {values}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"data.image_size must be in 8..1024 pixels, got {self.image_size}")
        if self.two_object_fraction > 0 and self.two_object_max_total < 2:
            raise ValueError(
                f"data.two_object_max_total must be >= 2 when data.two_object_fraction > 0 "
                f"(two groups of at least one object), got {self.two_object_max_total}"
            )
        if not self.counts or min(self.counts) < 1 or max(self.counts) >= len(NUMBERS):
            raise ValueError(f"data.counts must be within 1..{len(NUMBERS) - 1}, got {self.counts}")
        for name in ("two_object_fraction", "position_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.two_object_fraction + self.position_fraction > 1.0:
            raise ValueError("data.two_object_fraction + data.position_fraction must be at most 1")


class ShapesTask:
    """The scene vocabulary, a deterministic renderer, and the lists of scenes of each kind."""

    def __init__(self, config: ShapesConfig | None = None):
        self.config = config or ShapesConfig()
        c = self.config
        self.single_scenes: list[Scene] = [
            Scene((Group(n, col, shp),)) for n, col, shp in product(c.counts, c.colours, c.shapes)
        ]
        largest = max(c.shapes, key=lambda name: SHAPES[name].size)
        try:
            self.render(Scene((Group(max(c.counts), c.colours[0], largest),)), np.random.default_rng(0))
        except ValueError:
            raise ValueError(
                f"{max(c.counts)} {largest}s do not fit on a {c.image_size}x{c.image_size} canvas; "
                f"raise data.image_size or lower data.counts"
            ) from None
        kinds = list(product(c.colours, c.shapes))
        self.two_object_scenes: list[Scene] = [
            Scene((Group(n1, *k1), Group(n2, *k2)))
            for k1, k2 in combinations(kinds, 2)
            for n1, n2 in product(c.counts, c.counts)
            if n1 + n2 <= c.two_object_max_total
        ]
        self.position_scenes: list[Scene] = [
            Scene((Group(1, *k1), Group(1, *k2)), relation)
            for k1, k2 in permutations(kinds, 2)
            for relation in RELATIONS
        ]
        excluded = {scene for _, scene in held_out_scenes(c)} if c.exclude_bench_prompts else set()
        self._pools = [
            (
                1.0 - c.two_object_fraction - c.position_fraction,
                [s for s in self.single_scenes if s not in excluded],
            ),
            (c.two_object_fraction, [s for s in self.two_object_scenes if s not in excluded]),
            (c.position_fraction, [s for s in self.position_scenes if s not in excluded]),
        ]

    def display_scenes(self) -> list[Scene]:
        """A fixed set for sample grids: every count with every shape, colours rotating."""
        c = self.config
        return [
            Scene((Group(n, c.colours[(i + j) % len(c.colours)], shape),))
            for i, n in enumerate(c.counts)
            for j, shape in enumerate(c.shapes)
        ]

    def training_scenes(self) -> list[Scene]:
        """Every scene training can draw (bench prompts left out when excluded)."""
        return [scene for share, pool in self._pools if share > 0 for scene in pool]

    def draw_scene(self, rng: np.random.Generator) -> Scene:
        u, cumulative = rng.random(), 0.0
        for share, pool in self._pools:
            cumulative += share
            if share > 0 and u < cumulative:
                return pool[rng.integers(len(pool))]
        return self._pools[0][1][rng.integers(len(self._pools[0][1]))]

    def render(self, scene: Scene, rng: np.random.Generator, max_tries: int = 100) -> np.ndarray:
        """Scene -> image (3, H, W) float32 in [0, 1]; objects never touch, not even diagonally.

        For a relation, the two objects' boxes are also apart along the relation's axis.
        """
        size = self.config.image_size
        masks = [(SHAPES[g.shape], COLOURS[g.colour]) for g in scene.groups for _ in range(g.count)]
        for _ in range(max_tries):
            occupied = np.zeros((size + 2, size + 2), dtype=bool)  # padded so a 1-px margin fits
            placed = []
            for mask, colour in masks:
                h, w = mask.shape
                for _ in range(max_tries):
                    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                    if not occupied[y : y + h + 2, x : x + w + 2].any():
                        occupied[y + 1 : y + h + 1, x + 1 : x + w + 1] = True
                        placed.append((y, x, mask, colour))
                        break
                else:
                    break
            if len(placed) == len(masks) and (
                scene.relation is None or self._separated(scene.relation, placed)
            ):
                image = np.zeros((3, size, size), dtype=np.float32)
                for y, x, mask, colour in placed:
                    h, w = mask.shape
                    for ch in range(3):
                        image[ch, y : y + h, x : x + w][mask] = colour[ch]
                return image
        raise ValueError(f"could not fit {caption(scene)!r} on a {size}x{size} canvas")

    @staticmethod
    def _separated(relation: str, placed: list) -> bool:
        (ay, ax, am, _), (by, bx, bm, _) = placed
        if relation in ("left of", "right of"):
            left, right = ((ax, am), (bx, bm)) if relation == "left of" else ((bx, bm), (ax, am))
            return left[0] + left[1].shape[1] <= right[0]
        top, bottom = ((ay, am), (by, bm)) if relation == "above" else ((by, bm), (ay, am))
        return top[0] + top[1].shape[0] <= bottom[0]


class ShapesDataset(torch.utils.data.Dataset):
    """Item i is a fresh scene drawn and rendered from rng(seed, i): endless, deterministic data.

    Returns (image (3, H, W) in [-1, 1], caption id into `captions`).
    """

    def __init__(self, task: ShapesTask, seed: int = 0, length: int = 10**9):
        self.task = task
        self.seed = seed
        self.length = length
        self.captions = [caption(s) for s in task.training_scenes()]
        self._ids = {c: i for i, c in enumerate(self.captions)}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, index])
        scene = self.task.draw_scene(rng)
        image = self.task.render(scene, rng)
        return torch.from_numpy(image) * 2 - 1, self._ids[caption(scene)]


# The held-out split that ShapesBench evaluates on; part of the bench version (changing it changes the
# prompts).
HELD_OUT_SEED = 20260203
HELD_OUT_PER_CATEGORY = 12


def held_out_scenes(config: ShapesConfig) -> list[tuple[str, Scene]]:
    """The fixed (category, scene) evaluation split of a shapes vocabulary (the same config always gives the
    same list).

    counting: every count with every shape, colour drawn; colour (single objects that are not also
    counting scenes), two_objects and position: drawn without replacement.
    """
    task = ShapesTask(replace(config, exclude_bench_prompts=False))
    c = task.config
    rng = np.random.default_rng(HELD_OUT_SEED)
    split = [
        ("counting", Scene((Group(n, c.colours[rng.integers(len(c.colours))], shape),)))
        for n in c.counts
        for shape in c.shapes
    ]
    taken = {scene for _, scene in split}
    singles = [s for s in task.single_scenes if s.total == 1 and s not in taken]  # no scene in two categories
    for category, pool in (
        ("colour", singles),
        ("two_objects", task.two_object_scenes),
        ("position", task.position_scenes),
    ):
        picks = rng.choice(len(pool), size=min(HELD_OUT_PER_CATEGORY, len(pool)), replace=False)
        split += [(category, pool[i]) for i in sorted(picks)]
    return split
