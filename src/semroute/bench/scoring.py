"""The exact scorer of shapes images: objects read back as connected components, judged against a scene.

A pixel belongs to an object if its brightest channel exceeds ON_THRESHOLD; 8-connected components
of at least MIN_PIXELS are objects, smaller ones are sampling specks. An object is clean when it is
a pixel-exact template of a known shape in a palette colour.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..data.shapes import COLOURS, SHAPES, Scene

ON_THRESHOLD = 0.35  # a pixel belongs to an object if its brightest channel exceeds this
MIN_PIXELS = 3  # smaller components are sampling specks, not objects


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether centre a (y, x) is <relation> centre b; image y grows downwards."""
    (ay, ax), (by, bx) = a, b
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


@dataclass(frozen=True)
class DetectedObject:
    """One connected component read back from an image."""

    colour: str
    shape: str
    pixels: int
    bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive)
    clean: bool  # pixel-exact template of a known shape in a palette colour

    @property
    def centre(self) -> tuple[float, float]:
        y0, x0, y1, x1 = self.bbox
        return (y0 + y1) / 2, (x0 + x1) / 2


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_COLOUR_NAMES = list(COLOURS)
_SHAPE_NAMES = list(SHAPES)
_SHAPE_FEATURES = np.array([(m.shape[0], m.shape[1], m.sum()) for m in SHAPES.values()], dtype=np.float32)
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def detect_objects(image: np.ndarray | torch.Tensor, min_pixels: int = MIN_PIXELS) -> list[DetectedObject]:
    """Read the objects in an image (3, H, W) in [0, 1]: 8-connected bright components of >= min_pixels.

    Each gets the nearest palette colour (mean RGB) and the nearest shape by (height, width, area).
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    on = image.max(axis=0) > ON_THRESHOLD
    labels, _ = ndimage.label(on, structure=_EIGHT_NEIGHBOURS)
    objects = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[slices] == index
        pixels = int(component.sum())
        if pixels < min_pixels:
            continue
        mean = image[:, slices[0], slices[1]][:, component].mean(axis=1)
        colour_distances = np.linalg.norm(_PALETTE - mean, axis=1)
        colour = int(colour_distances.argmin())
        h, w = component.shape
        shape = int(np.abs(_SHAPE_FEATURES - np.array([h, w, pixels], dtype=np.float32)).sum(axis=1).argmin())
        template = SHAPES[_SHAPE_NAMES[shape]]
        clean = (
            template.shape == component.shape
            and bool((template == component).all())
            and colour_distances[colour] < 0.3
        )
        bbox = (slices[0].start, slices[1].start, slices[0].stop, slices[1].stop)
        objects.append(DetectedObject(_COLOUR_NAMES[colour], _SHAPE_NAMES[shape], pixels, bbox, clean))
    return objects


def score(image: np.ndarray | torch.Tensor, scene: Scene) -> dict[str, bool]:
    """Judge an image against its scene; every check fails unless every object in it is a clean shape.

    An object (a blob of >= MIN_PIXELS) that is not a pixel-exact shape in a palette colour is an object
    drawn wrong, not nothing: otherwise a smear of noise reads as "one object of some colour" and earns
    counting at N=1 (uniform noise scored 25% counting, 18% colour before this rule; now 0).
    count: exactly the prompted total of objects; colour / shape: at least one object, each of a
    prompted colour / shape; exact: the objects per (colour, shape) are exactly the prompted ones and,
    for a relation, the first object's centre stands in that relation to the second's; clean: at least
    one object, and all of them clean (whatever the prompt).
    """
    objects = detect_objects(image)
    if not all(o.clean for o in objects):
        return {"count": False, "colour": False, "shape": False, "exact": False, "clean": False}
    found = Counter((o.colour, o.shape) for o in objects)
    wanted = Counter({(g.colour, g.shape): g.count for g in scene.groups})
    colours = {g.colour for g in scene.groups}
    shapes = {g.shape for g in scene.groups}
    exact = found == wanted
    if exact and scene.relation is not None:
        a, b = scene.groups
        centre = {(o.colour, o.shape): o.centre for o in objects}
        exact = relation_holds(scene.relation, centre[(a.colour, a.shape)], centre[(b.colour, b.shape)])
    return {
        "count": len(objects) == scene.total,
        "colour": bool(objects) and all(o.colour in colours for o in objects),
        "shape": bool(objects) and all(o.shape in shapes for o in objects),
        "exact": exact,
        "clean": bool(objects),  # something drawn, and all of it clean shapes
    }


def fidelity_counts(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(clean objects, all blobs including specks): how well-formed the image is, whatever the prompt."""
    objects = detect_objects(image, min_pixels=1)
    return sum(o.clean for o in objects), len(objects)


def accuracy(images: torch.Tensor, scenes: list[Scene], images_per_prompt: int) -> dict:
    """Share of images whose count / colour / shape / everything is right, overall and per prompted count."""
    totals: dict[str, float] = defaultdict(float)
    per_count: dict[int, list[bool]] = defaultdict(list)
    for i, image in enumerate(images):
        scene = scenes[i // images_per_prompt]
        result = score(image, scene)
        for key, ok in result.items():
            totals[key] += ok
        per_count[scene.total].append(result["count"])
    n = len(images)
    return {
        "images": n,
        **{f"{key}_accuracy": value / n for key, value in totals.items()},
        "count_accuracy_by_n": {str(k): sum(v) / len(v) for k, v in sorted(per_count.items())},
    }
