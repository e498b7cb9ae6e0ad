"""Ragged text caches against padded ones on this CPU, at a reduced size: precompute and cached training.

Captions are GenAI-Bench's prompts (real lengths) on random 16 px images in pixel space, encoded by the
embedded SmolLM2 (all 30 layers, as S2 reads them); the padded design pads to --max-length (128 here, the
paper's 512 scaled down with everything else). Both designs run in this one process, alternately, so that a
busy machine slows both alike:

    precompute   semroute's: chunks sorted by length, rows stored ragged; padded: the design before cache
                 version 4, chunks in the data's order and every row padded to max_length on disk
    training     S2 on the cpu-small DiT, batch 32, from each cache: batches padded to their longest prompt,
                 or to max_length (what a padded cache cost before)

    python benchmarks/ragged_cache.py [--rows 128] [--steps 30] [--rounds 2] [--max-length 128]

Prints each figure and the ratios (padded / ragged for time and bytes, ragged / padded for img/s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from semroute import sources
from semroute.bench.public import read_prompts
from semroute.config import load_config
from semroute.data.cache import CACHE_DTYPES, CACHE_META, cache_recipe, collate_rows, shard_name
from semroute.data.images import ImageCaptionDataset, to_training_tensor
from semroute.fileio import file_digest
from semroute.precompute import precompute
from semroute.runtime import cpu_capability, resolve_precision
from semroute.text_encoder import TextEncoder
from semroute.train import train

GENAI_BENCH = Path(__file__).resolve().parents[2] / "shared" / "eval" / "genaibench" / "genai_image_527.json"
TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>"


def run_config(manifest: Path, max_length: int, steps: int) -> dict:
    return {
        "model": {"preset": "cpu-small", "strategy": "depth", "sample_size": 16, "in_channels": 3},
        "text_encoder": {"model": "smollm2-135m-instruct", "max_length": max_length, "template": TEMPLATE},
        "dataset": {"manifest": str(manifest), "resolution": 16},
        "train": {
            "batch_size": 32,
            "max_steps": steps,
            "checkpoint_every": 10_000,
            "log_every": 10_000,
            "sample_grids": False,
            "mixed_precision": "auto",
        },
    }


def write_data(root: Path, prompts: list[str]) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i, prompt in enumerate(prompts):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "text": prompt})
    manifest = root / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    return manifest


def padded_precompute(config, out: Path, encoder: TextEncoder, dtype: str, batch_size: int = 16) -> None:
    """The design before cache version 4: chunks in data order, each row padded to max_length on disk."""
    d, length = config.dataset, config.text_encoder.max_length
    dataset = ImageCaptionDataset(d)
    out.mkdir(parents=True)
    pairs = [(i, c) for i in range(len(dataset)) for c in dataset.captions_of(i)]
    pixels, text, masks = [], [], []
    for b in range(0, len(pairs), batch_size):
        batch = pairs[b : b + batch_size]
        images = [dataset.load_image(i) for i, _ in batch]
        pixels.append(torch.stack([to_training_tensor(im, d.resolution, d.background_rgb) for im in images]))
        h, m = encoder.features([c for _, c in batch])
        pad = length - h.shape[2]
        text.append(F.pad(h.transpose(0, 1), (0, 0, 0, pad)).to(CACHE_DTYPES[dtype]))
        masks.append(F.pad(m, (0, pad)))
    save_file(
        {"latents": torch.cat(pixels), "text": torch.cat(text), "mask": torch.cat(masks)}, out / shard_name(0)
    )
    h, m = encoder.features([""])
    pad = length - h.shape[2]
    null = F.pad(h[:, 0], (0, 0, 0, pad)).to(CACHE_DTYPES[dtype])
    save_file({"text": null, "mask": F.pad(m[0], (0, pad))}, out / "null.safetensors")
    recipe = {**cache_recipe(encoder, d, None, dtype, 1024), "version": 3}
    shard = {"file": shard_name(0), "rows": len(pairs), "bytes": (out / shard_name(0)).stat().st_size}
    shard["sha256"] = file_digest(out / shard_name(0))
    meta = {"recipe": recipe, "complete": True, "rows": len(pairs), "shards": [shard], "skipped": {}}
    meta.update(null_bytes=(out / "null.safetensors").stat().st_size, null_sha256=None)
    (out / CACHE_META).write_text(json.dumps(meta))


def pad_to(length: int):
    """A collate that pads every batch to `length` tokens: how batches of a padded cache were made."""

    def collate(rows):
        latents, text, mask = collate_rows(rows)
        pad = length - text.shape[2]
        return latents, F.pad(text, (0, 0, 0, pad)), F.pad(mask, (0, pad))

    return collate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=128, help="captioned images (GenAI-Bench prompts)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each design")
    parser.add_argument("--max-length", type=int, default=128, help="the padded design's length")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="ragged-", dir=args.work))
    try:
        prompts = [p.prompt for p in read_prompts("genaibench", GENAI_BENCH)][: args.rows]
        manifest = write_data(work / "data", prompts)
        raw = run_config(manifest, args.max_length, args.steps)
        config = load_config(raw)
        encoder = TextEncoder(config.text_encoder)
        counts = np.minimum(encoder.token_counts(prompts), args.max_length)
        dtype = resolve_precision(config.train.mixed_precision, torch.device("cpu")).name  # what auto stores
        print(
            f"cpu capability {cpu_capability()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print(
            f"{len(prompts)} prompts: {counts.mean():.1f} tokens mean, {counts.max()} max; padded design: "
            f"{args.max_length}; features stored in {dtype} (auto on this machine)"
        )
        times: dict[str, list[float]] = {"ragged": [], "padded": []}
        rates: dict[str, list[float]] = {"ragged": [], "padded": []}
        bytes_: dict[str, int] = {}
        for r in range(args.rounds):
            for design in ("ragged", "padded") if r % 2 == 0 else ("padded", "ragged"):
                out = work / f"cache-{design}-{r}"
                start = time.perf_counter()
                if design == "ragged":
                    precompute(config, out, dtype=dtype, progress=False, encoder=encoder, device="cpu")
                else:
                    padded_precompute(config, out, encoder, dtype)
                times[design].append(time.perf_counter() - start)
                bytes_[design] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                trained = {**raw, "dataset": {"cache": str(out), "resolution": 16}}
                original = sources.collate_rows
                sources.collate_rows = pad_to(args.max_length) if design == "padded" else original
                try:
                    result = train(load_config(trained), work / f"run-{design}-{r}", progress=False)
                finally:
                    sources.collate_rows = original
                rates[design].append(result.images_per_s)
                shutil.rmtree(out)
                print(
                    f"round {r} {design}: precompute {times[design][-1]:.1f} s, "
                    f"{bytes_[design] / 1e6:.1f} MB; "
                    f"training {result.images_per_s:.1f} img/s"
                )
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: statistics.median(v) for k, v in rates.items()}
        print(f"cache_bytes_ratio_ragged_over_padded   {bytes_['ragged'] / bytes_['padded']:.3f}")
        print(f"precompute_time_ratio_ragged_over_padded {med['ragged'] / med['padded']:.3f}")
        print(
            f"training_img_per_s_ragged_over_padded  {rate['ragged'] / rate['padded']:.2f}  (target >= 1.2; "
            f"{rate['ragged']:.1f} vs {rate['padded']:.1f} img/s)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
