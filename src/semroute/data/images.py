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
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, ImageColor

from ..base import check_size

logger = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """Real image-caption data. With none of manifest /
    hf_dataset / cache set, training uses the shapes task."""

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
    # Larger images are skipped and counted (a decompression bomb never reaches memory).
    max_image_pixels: int = 64_000_000
    # Manifest image paths must stay inside image_root (no ../ or absolute paths elsewhere) unless this is
    # true.
    allow_paths_outside_root: bool = False
    # What transparent pixels show: a colour name or #rrggbb that images with alpha are composited onto.
    background: str = "white"

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        red, green, blue = ImageColor.getrgb(self.background)[:3]
        return red, green, blue

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.manifest, self.hf_dataset, self.cache))

    def __post_init__(self) -> None:
        sources = [k for k in ("manifest", "hf_dataset", "cache") if getattr(self, k) is not None]
        if len(sources) > 1:
            raise ValueError(
                f"dataset: set one of manifest, hf_dataset or cache, not {' and '.join(sources)}"
            )
        if self.resolution < 8:
            raise ValueError(f"dataset.resolution must be >= 8, got {self.resolution}")
        if self.num_workers < 0:
            raise ValueError(f"dataset.num_workers must be >= 0, got {self.num_workers}")
        check_size(self.num_workers, "dataset.num_workers", "num_workers")
        if self.resolution > 8192 or self.resolution**2 > self.max_image_pixels:
            raise ValueError(
                f"dataset.resolution {self.resolution} is beyond 8192 or dataset.max_image_pixels; "
                f"train at a smaller resolution"
            )
        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            raise ValueError(
                f"dataset.background must be a colour name or #rrggbb, got {self.background!r}"
            ) from None
        if self.max_image_pixels < 1:
            raise ValueError(f"dataset.max_image_pixels must be >= 1, got {self.max_image_pixels}")


class BadImageError(ValueError):
    """A missing or unreadable image in strict mode."""


WHITE = (255, 255, 255)


def has_alpha(image: Image.Image) -> bool:
    """Whether some pixels of `image` may be (partly) transparent: an alpha band or a transparency key."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """8-bit RGB from any mode: 16-bit and 32-bit integer images scaled from 0..65535, float images from
    0..1, and transparent pixels composited onto `background` (dropping alpha would keep whatever colour
    the transparent pixels happen to hold)."""
    if has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "F" else 65535.0
        array = np.clip(np.nan_to_num(array / scale), 0.0, 1.0)
        return Image.fromarray((array * 255).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def to_training_tensor(
    image: Image.Image, resolution: int, background: tuple[int, int, int] = WHITE
) -> torch.Tensor:
    """Composite any transparency onto `background`, resize the shorter side to `resolution` (bicubic),
    center-crop a square, scale to [-1, 1]: (3, R, R).

    An image whose resized long side would be huge (a 1 x 100000 strip) is resampled from the crop's box
    of the original instead, so memory stays bounded (the result differs from two-step resizing by a few
    levels).
    """
    image = to_rgb(image, background)
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    if size[0] * size[1] <= 16 * resolution * resolution:
        image = image.resize(size, Image.Resampling.BICUBIC).crop(
            (left, top, left + resolution, top + resolution)
        )
    else:
        box = (
            left * w / size[0],
            top * h / size[1],
            (left + resolution) * w / size[0],
            (top + resolution) * h / size[1],
        )
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class _TooLarge(Exception):
    pass


def open_image(path: Path, resolution: int, max_pixels: int) -> Image.Image:
    """Decode an image file, at reduced size where the format allows (JPEG) and never past `max_pixels`.

    Raises ValueError with why the file cannot be used. Pillow's plugins answer a malformed file with
    many exception types; every one of them means "cannot be decoded" here.
    """
    try:
        with Image.open(path) as image:
            w, h = image.size
            if w < 1 or h < 1 or w * h > max_pixels:
                raise _TooLarge(f"{w} x {h} pixels is outside 1..dataset.max_image_pixels ({max_pixels})")
            scale = resolution / min(w, h)
            if scale <= 0.5:  # JPEG decodes at 1/2, 1/4 or 1/8 scale, never below the size asked for
                image.draft("RGB", (max(resolution, round(w * scale)), max(resolution, round(h * scale))))
            image.load()
            return image.copy()
    except _TooLarge as err:
        raise ValueError(str(err)) from None
    except Image.DecompressionBombError:
        raise ValueError(
            "a decompression bomb: its header claims more pixels than Pillow's limit "
            "(and than dataset.max_image_pixels)"
        ) from None
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise ValueError(f"cannot be decoded ({err.__class__.__name__})") from None


def read_user_text(path: Path, what: str) -> str:
    """A user-supplied UTF-8 text file (a BOM is allowed); errors name what it is and the fix."""
    if not path.is_file():
        if path.exists():  # a directory, a FIFO, a device: reading would fail, block or never end
            raise ValueError(f"{what} {path} is not a regular file; point at the file itself")
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


def parse_json(text: str, what: str, expected: type, hint: str) -> Any:
    """One JSON document of the `expected` type; otherwise an
    error naming `what` (the file) and `hint` (the fix)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not JSON ({err.msg} at line {err.lineno}); {hint}") from None
    if not isinstance(value, expected):
        raise ValueError(f"{what} must hold a JSON {expected.__name__}, got {type(value).__name__}; {hint}")
    return value


def _inside(root: Path, name: object, where: str, allow_outside: bool) -> Path:
    """The image path of a manifest row; one that leaves `root`
    (../, an absolute path) is an error unless allowed."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{where}: the image must be a non-empty path string, got {name!r:.120}")
    path = root / name
    # realpath, not Path.resolve: a symlink loop then stays a path that is no file (skipped), not an
    # exception.
    if not allow_outside and not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise ValueError(
            f"{where}: image {name!r:.120} lies outside image_root {root}; move it under image_root or set "
            f"dataset.allow_paths_outside_root: true"
        )
    return path


def read_manifest(path: Path) -> list[dict]:
    """Rows of a .json list or a .jsonl file; errors name the file and line."""
    text = read_user_text(path, "manifest")
    if path.suffix == ".jsonl":
        rows = parse_jsonl(text, path)
    else:
        rows = parse_json(
            text,
            f"manifest {path}",
            list,
            "a .json manifest is a list of rows; use .jsonl for one row a line",
        )
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    return rows


def _captions(value: object, where: str) -> list[str]:
    """The usable captions of a row: strings, lone surrogates replaced (they cannot be tokenized), empty ones
    dropped.

    A row whose every caption is empty gets none (the caller skips and counts it); a caption that is not
    a string is an error naming the row.
    """
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(
            f"{where}: the caption must be a string or a non-empty list of strings, got {value!r:.120}"
        )
    cleaned = [c.encode("utf-8", "replace").decode("utf-8") for c in captions]
    return [c for c in cleaned if c.strip()]


@dataclass
class SkipLog:
    """Images that could not be used, with why (reported in the log and the run summary)."""

    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, reason: str, strict: bool) -> None:
        if strict:
            raise BadImageError(
                f"image {name}: {reason}; fix or remove it, or set dataset.strict: false to skip such images"
            )
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
            self.items: list[tuple[Any, list[str] | None]] = []  # (path or row, captions)
            for number, row in enumerate(read_manifest(manifest), 1):
                where = f"manifest {manifest} row {number}"
                if not isinstance(row, dict) or config.image_key not in row or config.text_key not in row:
                    raise ValueError(
                        f"{where} needs keys {config.image_key!r} and {config.text_key!r} "
                        f"(set dataset.image_key / dataset.text_key), got {row!r:.120}"
                    )
                image = _inside(root, row[config.image_key], where, config.allow_paths_outside_root)
                captions = _captions(row[config.text_key], where)
                if not image.is_file():
                    self.skips.add(str(image), "file not found", config.strict)
                    continue
                if not captions:
                    self.skips.add(str(image), "every caption is empty", config.strict)
                    continue
                self.items.append((image, captions))
        elif config.hf_dataset is not None:
            self._hf = load_hf_dataset(config)
            self.items = [(i, None) for i in range(len(self._hf))]
        else:
            raise ValueError("ImageCaptionDataset needs dataset.manifest or dataset.hf_dataset")
        if not self.items:
            raise ValueError("the dataset has no usable images (every row was skipped)")
        if self.skips:
            logger.warning(
                "%d of %d images skipped (missing)", len(self.skips), len(self.skips) + len(self.items)
            )

    def __len__(self) -> int:
        return len(self.items)

    def captions_of(self, index: int) -> list[str]:
        """The row's usable captions (empty for a row of a saved dataset whose captions are all empty)."""
        source, captions = self.items[index]
        if captions is None:
            rows = cast(Any, self._hf)  # a saved HF dataset: only its rows have no captions yet
            captions = _captions(rows[source][self.config.text_key], f"{self.config.hf_dataset} row {source}")
        return captions

    def load_image(self, index: int) -> Image.Image | None:
        source, _ = self.items[index]
        if self._hf is not None:
            name = f"{self.config.hf_dataset} row {source}"
            try:
                image = self._hf[source][self.config.image_key]
            except Exception as err:  # the datasets library decodes here and raises what PIL raised
                self.skips.add(name, f"cannot be decoded ({err.__class__.__name__})", self.config.strict)
                return None
            if not isinstance(image, Image.Image):
                self.skips.add(
                    name, f"column {self.config.image_key!r} does not hold an image", self.config.strict
                )
                return None
            if image.width * image.height > self.config.max_image_pixels:
                self.skips.add(
                    name,
                    f"{image.width} x {image.height} pixels is over dataset.max_image_pixels",
                    self.config.strict,
                )
                return None
            return image
        try:
            return open_image(source, self.config.resolution, self.config.max_image_pixels)
        except ValueError as err:
            self.skips.add(str(source), str(err), self.config.strict)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | None:
        captions = self.captions_of(index)
        if not captions:
            self.skips.add(
                f"{self.config.hf_dataset} row {self.items[index][0]}",
                "every caption is empty",
                self.config.strict,
            )
            return None
        image = self.load_image(index)
        if image is None:
            return None
        caption = captions[random.Random(hash((self.seed, index, self.epoch))).randrange(len(captions))]
        return to_training_tensor(image, self.config.resolution, self.config.background_rgb), caption


def collate_skipping(batch: list) -> tuple[torch.Tensor, list[str]] | None:
    """Stack the usable items of a batch; None when every item was skipped."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.stack([image for image, _ in batch]), [text for _, text in batch]


def load_hf_dataset(config: DatasetConfig) -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError("dataset.hf_dataset needs the `datasets` package: pip install datasets") from None
    path = Path(str(config.hf_dataset)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset.hf_dataset {path} is not a directory written by save_to_disk")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"{path} holds splits {list(data)} but no 'train' split")
        data = data["train"]
    for key in (config.image_key, config.text_key):
        if key not in data.column_names:
            raise ValueError(
                f"{path} has columns {data.column_names}, no {key!r}; set dataset.image_key / "
                "dataset.text_key"
            )
    return data
