"""The real-image benchmark: sample every held-out caption of a set made by `semroute data`, and judge the
images against the real ones with a network we did not train (`bench.judge`).

Scores (each with its chance level; `bench.image_metrics` defines them):
- FD against the real held-out images, beside the real images' own split-half FD;
- retrieval top-1 / top-5: generated image i finds real image i among all held-out images;
- attribute accuracy: among the real images of captions that differ from caption i in one attribute
  (the skin tones of one emoji, the members of a family), generated image i is closest to its own.
The ceiling row scores the real held-out images after a pass through the pipeline's autoencoder: what a
perfect generator could reach through that decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.images import DatasetConfig, open_image, read_manifest, to_training_tensor
from ..latent import decode_latents, encode_latents, vae_downsample
from .image_metrics import attribute_hits, frechet_distance, retrieval, split_half_fd
from .judge import ImageJudge
from .sampling import sample_all

if TYPE_CHECKING:
    from ..pipeline import SemanticRoutingPipeline

VERSION = 1
TRAIN_FILE, HELDOUT_FILE = "train.jsonl", "heldout.jsonl"
MAX_IMAGE_PIXELS = 64_000_000


def _parts(caption: str) -> tuple[str, tuple[str, ...]]:
    """'family: man, woman, boy' -> ('family', ('man', 'woman', 'boy')); no ': ' means no parts."""
    head, _, rest = caption.partition(": ")
    return head, tuple(p.strip() for p in rest.split(",")) if rest else ()


def one_attribute_siblings(rows: Sequence[dict], text_key: str = "text") -> list[list[int]]:
    """For each row, the rows (itself included) whose caption differs from its own in exactly one attribute:
    the same `base` (the emoji without its skin tones), or the same head with as many comma-separated parts
    and one part changed ("family: man, man, girl" and "family: man, man, boy")."""
    parsed = [_parts(str(row[text_key])) for row in rows]
    by_base: dict[Any, list[int]] = {}
    by_head: dict[tuple[str, int], list[int]] = {}
    for i, row in enumerate(rows):
        if row.get("base") is not None:
            by_base.setdefault(row["base"], []).append(i)
        head, parts = parsed[i]
        if parts:
            by_head.setdefault((head, len(parts)), []).append(i)
    groups = []
    for i, row in enumerate(rows):
        found = set(by_base.get(row.get("base"), [i])) if row.get("base") is not None else {i}
        head, parts = parsed[i]
        for j in by_head.get((head, len(parts)), []) if parts else []:
            if sum(a != b for a, b in zip(parts, parsed[j][1], strict=True)) == 1:
                found.add(j)
        groups.append(sorted(found | {i}))
    return groups


def real_images(rows: Sequence[dict], root: Path, resolution: int, background: str = "white") -> torch.Tensor:
    """The rows' images as the DiT was trained to make them (composited, resized, cropped): (N, 3, R, R)
    in [0, 1]."""
    rgb = DatasetConfig(background=background).background_rgb  # the colour as training composites onto
    out = []
    for row in rows:
        path = root / row["image"]
        try:
            image = open_image(path, resolution, MAX_IMAGE_PIXELS)
        except ValueError as err:
            raise ValueError(f"real image {path}: {err}; rebuild the set with `semroute data`") from None
        out.append((to_training_tensor(image, resolution, rgb) + 1) / 2)
    return torch.stack(out)


def score_images(
    generated: torch.Tensor,
    real: torch.Tensor,
    bank: torch.Tensor,
    candidates: Sequence[Sequence[int]],
    images_per_prompt: int,
) -> dict:
    """Scores of generated features (N * n, D), grouped by prompt, against the real held-out features (N, D).

    bank / candidates: the real features of every sibling image and, per prompt, the bank indices of its
    sibling group with its own image first (a group of one: no attribute score for that prompt).
    """
    n, count = images_per_prompt, len(real)
    if len(generated) != n * count:
        raise ValueError(f"expected {n} generated images for each of {count} prompts, got {len(generated)}")
    by_image = generated.view(count, n, -1)
    top1 = torch.stack([retrieval(by_image[:, k], real, 1) for k in range(n)], 1).double().mean(1)
    top5 = torch.stack([retrieval(by_image[:, k], real, 5) for k in range(n)], 1).double().mean(1)
    grouped = [i for i, group in enumerate(candidates) if len(group) > 1]
    attribute: list[float | None] = [None] * count
    chance = float("nan")
    if grouped:
        hits = []
        for k in range(n):
            found, chance = attribute_hits(
                by_image[grouped, k],
                bank,
                [candidates[i] for i in grouped],
                [candidates[i][0] for i in grouped],
            )
            hits.append(found.double())
        for i, value in zip(grouped, torch.stack(hits, 1).mean(1).tolist(), strict=True):
            attribute[i] = value
    scored = [a for a in attribute if a is not None]
    return {
        "fd": frechet_distance(generated, real),
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "attribute": sum(scored) / len(scored) if scored else None,
        "chance": {"top1": 1 / count, "top5": min(5, count) / count, "attribute": chance},
        "attribute_prompts": len(scored),
        "per_prompt": {"top1": top1.tolist(), "top5": top5.tolist(), "attribute": attribute},
    }


def _bank(held: list[dict], train: list[dict]) -> tuple[list[dict], list[list[int]]]:
    """The real rows that attribute accuracy compares against, and each held-out row's group in them
    (own image first): the held-out rows, then the training rows that are a sibling of one of them."""
    rows = held + train
    groups = one_attribute_siblings(rows)[: len(held)]
    needed = sorted({j for group in groups for j in group} | set(range(len(held))))
    where = {j: position for position, j in enumerate(needed)}
    ordered = [[where[i]] + [where[j] for j in group if j != i] for i, group in enumerate(groups)]
    return [rows[j] for j in needed], ordered


def run_realbench(
    pipeline: SemanticRoutingPipeline,
    data: Path,
    images_per_prompt: int = 1,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 64,
    judge: ImageJudge | None = None,
) -> dict:
    """Sample the held-out captions of the set in `data` and score them (see the module's docstring)."""
    for name in (TRAIN_FILE, HELDOUT_FILE):
        if not (data / name).is_file():
            raise FileNotFoundError(
                f"{data} has no {name}; --data must be a directory written by `semroute data emoji --out DIR`"
            )
    held = read_manifest(data / HELDOUT_FILE)[:limit]
    if len(held) < 6:
        raise ValueError(
            f"{data / HELDOUT_FILE} has {len(held)} rows; the scores need at least 6 held-out captions"
        )
    train = read_manifest(data / TRAIN_FILE)
    bank_rows, candidates = _bank(held, train)
    factor = vae_downsample(pipeline.vae) if pipeline.vae is not None else 1
    resolution = pipeline.transformer.config["sample_size"] * factor
    judge = judge or ImageJudge()
    bank_images = real_images(bank_rows, data, resolution)
    real_images_held = bank_images[: len(held)]
    bank = judge.features(bank_images)
    real = bank[: len(held)]
    prompts = [str(row["text"]) for row in held]
    generated = sample_all(
        pipeline,
        prompts,
        images_per_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        shift=shift,
        seed=seed,
        batch_size=batch_size,
        desc="sampling held-out captions",
    )
    result = score_images(judge.features(generated), real, bank, candidates, images_per_prompt)
    ceiling = score_images(
        judge.features(_through_decoder(pipeline, real_images_held)), real, bank, candidates, 1
    )
    return {
        "version": VERSION,
        "data": str(data),
        "prompts": prompts,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "resolution": resolution,
        "sampling": sampling_record(pipeline, steps, guidance_scale, shift),
        **result,
        "real_split_half_fd": split_half_fd(real),
        "ceiling": {k: v for k, v in ceiling.items() if k != "per_prompt"},
        "generated": generated,
    }


def sampling_record(
    pipeline: SemanticRoutingPipeline, steps: int | None, guidance_scale: float | None, shift: float | None
) -> dict:
    """The sampling settings a result was made with (the pipeline's own where None)."""
    settings = pipeline.sampling(steps, guidance_scale, shift)
    return {"steps": settings.steps, "guidance_scale": settings.guidance_scale, "shift": settings.shift}


@torch.no_grad()
def _through_decoder(pipeline: SemanticRoutingPipeline, images: torch.Tensor) -> torch.Tensor:
    """Real images (N, 3, R, R) in [0, 1] after encoding and decoding with the pipeline's VAE (themselves in
    pixel space)."""
    if pipeline.vae is None:
        return images
    out = [
        decode_latents(pipeline.vae, encode_latents(pipeline.vae, images[i : i + 64] * 2 - 1))
        for i in range(0, len(images), 64)
    ]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)
