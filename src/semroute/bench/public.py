"""Sample the public benchmarks' prompts into the folder layouts their own scorers read.

We write images; GenEval (Mask2Former + CLIP), GenAI-Bench (VQAScore) and DrawBench (human or
model raters) are scored elsewhere with their own tools. Layouts:

- geneval:    OUT/<index:05d>/metadata.jsonl (that prompt's line) and OUT/<index:05d>/samples/<k:04d>.png
- genaibench: OUT/sample_<k>/<id>.jpeg, each sample_<k> folder laid out like one model's images for
              t2v_metrics' GenAI-Bench evaluation (one image per prompt id)
- drawbench:  OUT/images/<index:03d>_<k>.png and OUT/metadata.csv (file, Prompt, Category)

Every image is written to a temporary name and renamed, so a re-run skips what exists and an
interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import PartialState
from PIL import Image

from ..base import one_line
from ..data.images import parse_json, parse_jsonl, read_user_text
from ..fileio import entries, read_json, write_atomic, write_json
from .sampling import batches, sample_batches

if TYPE_CHECKING:
    import torch

    from ..pipeline import SemanticRoutingPipeline

BENCHES = ("geneval", "genaibench", "drawbench")
SETTINGS_FILE = ".semroute-sampling.json"  # hidden: the scorers walk the folders, not the files beside them
# A prompt id is a file name: nothing that climbs out
SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@dataclass
class PublicPrompt:
    index: int
    key: str  # GenAI-Bench's id ("00001"), otherwise the index
    prompt: str
    metadata: dict  # the prompt's own record, written back where the layout wants it


def read_prompts(bench: str, path: Path) -> list[PublicPrompt]:
    """The prompts of a user-supplied benchmark file; errors name the file and what is wrong."""
    if bench not in BENCHES:
        raise ValueError(f"unknown --bench {bench!r}; valid: {', '.join(BENCHES)}")
    text = read_user_text(path, "prompt file")
    prompts: list[PublicPrompt] = []
    if bench == "geneval":
        for record in parse_jsonl(text, path, hint="; GenEval prompts are one JSON object a line"):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path} prompt {len(prompts) + 1} has no string 'prompt'")
            prompts.append(PublicPrompt(len(prompts), f"{len(prompts):05d}", record["prompt"], record))
    elif bench == "genaibench":
        records = parse_json(
            text, str(path), dict, 'GenAI-Bench prompts are one object keyed by prompt id ("00001": {...})'
        )
        for key in sorted(records):
            if not SAFE_ID.fullmatch(str(key)):
                raise ValueError(
                    f"{path} has prompt id {str(key)!r:.60}; ids become file names, so they may hold only "
                    f"letters, digits, '.', '_' and '-' (and not start with '.')"
                )
            record = records[key]
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path} entry {key!r} has no string 'prompt'")
            prompts.append(PublicPrompt(len(prompts), str(key), record["prompt"], record))
    else:
        reader = csv.DictReader(io.StringIO(text))
        try:
            if not reader.fieldnames or "Prompt" not in reader.fieldnames:
                raise ValueError(
                    f"{path} must be a CSV with a header holding 'Prompt' (and 'Category'), got "
                    f"{reader.fieldnames}"
                )
            for row in reader:
                if not isinstance(row.get("Prompt"), str):
                    raise ValueError(f"{path} line {reader.line_num} has no 'Prompt' field")
                prompts.append(PublicPrompt(len(prompts), f"{len(prompts):03d}", row["Prompt"], dict(row)))
        except csv.Error as err:  # e.g. a field past the csv module's size limit, a NUL byte
            raise ValueError(
                f"{path} line {reader.line_num} is not readable CSV ({one_line(err, 100)}); a DrawBench "
                "prompt file holds one short prompt per row"
            ) from None
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def check_settings(path: Path, settings: dict) -> None:
    """An output made with other sampling settings (or prompts)
    is refused: its images would answer another question."""
    if not path.parent.exists():
        return
    if not path.is_file():
        if entries(path.parent):
            raise ValueError(
                f"{path.parent} holds files but no {path.name}: it was not written by sample-bench; "
                f"choose another --out"
            )
        return
    found = read_json(path, "sampling record", "it is damaged: choose another --out")
    differences = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
    if differences:
        raise ValueError(
            f"{path.parent} was sampled with other settings ({', '.join(differences)} differ); "
            f"sample into another --out, or repeat the same settings to resume"
        )


def image_path(bench: str, out: Path, prompt: PublicPrompt, k: int) -> Path:
    if bench == "geneval":
        return out / f"{prompt.index:05d}" / "samples" / f"{k:04d}.png"
    if bench == "genaibench":
        return out / f"sample_{k}" / f"{prompt.key}.jpeg"
    return out / "images" / f"{prompt.index:03d}_{k}.png"


def _write_line(line: str, path: Path) -> None:
    path.write_text(line + "\n")


def write_metadata(bench: str, out: Path, prompts: list[PublicPrompt], n: int) -> None:
    """The per-prompt files the layout needs besides the images."""
    if bench == "geneval":
        for p in prompts:
            write_atomic(
                out / f"{p.index:05d}" / "metadata.jsonl",
                functools.partial(_write_line, json.dumps(p.metadata)),
            )
    elif bench == "drawbench":

        def write_csv(tmp: Path) -> None:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["file", "Prompt", "Category"])
                for p in prompts:
                    for k in range(n):
                        writer.writerow(
                            [
                                image_path(bench, out, p, k).relative_to(out).as_posix(),
                                p.prompt,
                                p.metadata.get("Category", ""),
                            ]
                        )

        write_atomic(out / "metadata.csv", write_csv)


def sample_bench(
    pipeline: SemanticRoutingPipeline,
    bench: str,
    prompts: list[PublicPrompt],
    out: Path,
    n: int = 4,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict | None:
    """Generate n images per prompt (image k of prompt i from seed + 1000 i + k), skipping existing ones.

    The batches are fixed slices of the full (prompt, k) list, whatever is already on disk and however
    many processes run: under `accelerate launch` process r samples batches r, r + N, ..., so every
    image is computed in the same batch as by one process, and the files are the same. A batch whose
    images all exist is skipped; in a partly written one only the missing images are saved. The main
    process returns the report; the others return None. steps / guidance_scale / shift: None takes
    the pipeline's own.
    """
    state = PartialState()
    sampling = asdict(pipeline.sampling(steps, guidance_scale, shift))
    sampling.pop("images_per_prompt")  # n below
    settings = {
        "bench": bench,
        "prompts": [p.prompt for p in prompts],
        "images_per_prompt": n,
        "seed": seed,
        "batch_size": batch_size,
        **sampling,
    }
    check_settings(out / SETTINGS_FILE, settings)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SETTINGS_FILE, settings)
        write_metadata(bench, out, prompts, n)
    state.wait_for_everyone()  # everyone sees the same files before deciding what is missing
    missing = [
        [not image_path(bench, out, prompts[i], k).is_file() for i, k in jobs]
        for jobs in batches(len(prompts), n, batch_size)
    ]
    state.wait_for_everyone()
    mine = [
        b for b in range(len(missing)) if b % state.num_processes == state.process_index and any(missing[b])
    ]
    sampled = sample_batches(
        pipeline,
        [p.prompt for p in prompts],
        n,
        steps,
        guidance_scale,
        shift,
        seed,
        batch_size,
        progress and state.is_main_process,
        desc=f"sample {bench}",
        only=mine,
    )
    for b, (jobs, images) in zip(mine, sampled, strict=True):
        for (i, k), image, todo in zip(jobs, images, missing[b], strict=True):
            if todo:
                _save_image(image, image_path(bench, out, prompts[i], k))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    written = sum(map(sum, missing))
    return {
        "bench": bench,
        "prompts": len(prompts),
        "images_per_prompt": n,
        "written": written,
        "already_there": len(prompts) * n - written,
    }


def _save_image(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> an 8-bit PNG or JPEG (quality 95), written atomically."""
    array = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    fmt = "JPEG" if path.suffix == ".jpeg" else "PNG"
    write_atomic(
        path,
        lambda tmp: Image.fromarray(array).save(
            tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})
        ),
    )
