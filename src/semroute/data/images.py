"""Image-caption datasets: JSON / JSONL manifests and Hugging Face `datasets` saved to disk.

A manifest row names an image (relative to `image_root`) and its caption(s):
    {"image": "cats/001.jpg", "text": "a cat on a sofa"}
    {"image": "dogs/002.png", "text": ["a dog", "a brown dog running on grass"]}
Key names are configurable. A list of captions gives one caption per visit, chosen by (seed, index, epoch).
Images are resized (shorter side) and center-cropped to the training resolution, scaled to [-1, 1].
Missing or unreadable images are skipped and counted; with `strict` the first one is an error.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """Real image-caption data. With none of manifest / hf_dataset / cache set, training uses the shapes task."""

    manifest: str | None = None  # a .json file holding a list of rows, or a .jsonl file with one row a line
    image_root: str | None = None  # where relative image paths start (default: the manifest's folder)
    hf_dataset: str | None = None  # a directory written by datasets' save_to_disk
    cache: str | None = None  # a directory written by `semroute precompute` (latents + text features)
    image_key: str = "image"
    text_key: str = "text"
    resolution: int = 256
    strict: bool = False  # a missing or corrupt image is an error instead of being skipped
    vae: str | None = None  # local AutoencoderKL directory; null trains in pixel space
    num_workers: int = 0

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.manifest, self.hf_dataset, self.cache))

    def __post_init__(self):
        sources = [k for k in ("manifest", "hf_dataset", "cache") if getattr(self, k) is not None]
        if len(sources) > 1:
            raise ValueError(f"dataset: set one of manifest, hf_dataset or cache, not {' and '.join(sources)}")
        if self.resolution < 8:
            raise ValueError(f"dataset.resolution must be >= 8, got {self.resolution}")
        if self.num_workers < 0:
            raise ValueError(f"dataset.num_workers must be >= 0, got {self.num_workers}")


class BadImageError(ValueError):
    """A missing or unreadable image in strict mode."""


def to_training_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bicubic), center-crop a square, scale to [-1, 1]: (3, R, R)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_user_text(path: Path, what: str) -> str:
    """A user-supplied UTF-8 text file (a BOM is allowed); errors name what it is and the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text: {err}") from None


def parse_jsonl(text: str, path: Path, hint: str = "") -> list:
    """One JSON value per non-blank line; a bad line is an error naming the file and line number."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not JSON ({err.msg}){hint}") from None
    return rows


def parse_json(text: str, what: str, expected: type, hint: str):
    """One JSON document of the `expected` type; otherwise an error naming `what` (the file) and `hint` (the fix)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not JSON ({err.msg} at line {err.lineno}); {hint}") from None
    if not isinstance(value, expected):
        raise ValueError(f"{what} must hold a JSON {expected.__name__}, got {type(value).__name__}; {hint}")
    return value


def read_manifest(path: Path) -> list[dict]:
    """Rows of a .json list or a .jsonl file; errors name the file and line."""
    text = read_user_text(path, "manifest")
    if path.suffix == ".jsonl":
        rows = parse_jsonl(text, path)
    else:
        rows = parse_json(text, f"manifest {path}", list, "a .json manifest is a list of rows; use .jsonl for one row a line")
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    return rows


def _captions(value, where: str) -> list[str]:
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: the caption must be a string or a non-empty list of strings, got {value!r}")
    return captions


@dataclass
class SkipLog:
    """Images that could not be used, with why (reported in the log and the run summary)."""

    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, reason: str, strict: bool) -> None:
        if strict:
            raise BadImageError(f"image {name}: {reason}; fix or remove it, or set dataset.strict: false to skip such images")
        if name not in self.skipped:
            logger.warning("skipping image %s: %s", name, reason)
        self.skipped[name] = reason

    def __len__(self) -> int:
        return len(self.skipped)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """(image tensor (3, R, R) in [-1, 1], caption) pairs from a manifest or a saved HF dataset.

    `skips` counts the images dropped: missing files are found when the dataset is built; files that
    exist but do not decode are found when read, and that item is returned as None (the collate
    function drops it).
    """

    def __init__(self, config: DatasetConfig, seed: int = 0):
        self.config = config
        self.seed = seed
        self.epoch = 0
        self.skips = SkipLog()
        self._hf = None
        if config.manifest is not None:
            manifest = Path(config.manifest).expanduser()
            root = Path(config.image_root).expanduser() if config.image_root else manifest.parent
            self.items: list[tuple[object, list[str]]] = []
            for number, row in enumerate(read_manifest(manifest), 1):
                where = f"manifest {manifest} row {number}"
                if not isinstance(row, dict) or config.image_key not in row or config.text_key not in row:
                    raise ValueError(
                        f"{where} needs keys {config.image_key!r} and {config.text_key!r} "
                        f"(set dataset.image_key / dataset.text_key), got {row!r:.120}"
                    )
                image = root / str(row[config.image_key])
                if not image.is_file():
                    self.skips.add(str(image), "file not found", config.strict)
                    continue
                self.items.append((image, _captions(row[config.text_key], where)))
        elif config.hf_dataset is not None:
            self._hf = load_hf_dataset(config)
            self.items = [(i, None) for i in range(len(self._hf))]
        else:
            raise ValueError("ImageCaptionDataset needs dataset.manifest or dataset.hf_dataset")
        if not self.items:
            raise ValueError("the dataset has no usable images (every row was skipped)")
        if self.skips:
            logger.warning("%d of %d images skipped (missing)", len(self.skips), len(self.skips) + len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def captions_of(self, index: int) -> list[str]:
        source, captions = self.items[index]
        if captions is None:
            captions = _captions(self._hf[source][self.config.text_key], f"dataset row {source}")
        return captions

    def load_image(self, index: int) -> Image.Image | None:
        source, _ = self.items[index]
        if self._hf is not None:
            image = self._hf[source][self.config.image_key]
            name = f"{self.config.hf_dataset} row {source}"
            if isinstance(image, Image.Image):
                return image
            self.skips.add(name, f"column {self.config.image_key!r} does not hold an image", self.config.strict)
            return None
        try:
            with Image.open(source) as image:
                image.load()
                return image.copy()
        except (UnidentifiedImageError, OSError) as err:
            self.skips.add(str(source), f"cannot be decoded ({err.__class__.__name__})", self.config.strict)
            return None

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if image is None:
            return None
        captions = self.captions_of(index)
        caption = captions[random.Random(hash((self.seed, index, self.epoch))).randrange(len(captions))]
        return to_training_tensor(image, self.config.resolution), caption


def collate_skipping(batch: list) -> tuple[torch.Tensor, list[str]] | None:
    """Stack the usable items of a batch; None when every item was skipped."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.stack([image for image, _ in batch]), [text for _, text in batch]


def load_hf_dataset(config: DatasetConfig):
    try:
        import datasets
    except ImportError:
        raise ValueError("dataset.hf_dataset needs the `datasets` package: pip install datasets") from None
    path = Path(config.hf_dataset).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset.hf_dataset {path} is not a directory written by save_to_disk")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"{path} holds splits {list(data)} but no 'train' split")
        data = data["train"]
    for key in (config.image_key, config.text_key):
        if key not in data.column_names:
            raise ValueError(f"{path} has columns {data.column_names}, no {key!r}; set dataset.image_key / dataset.text_key")
    return data
