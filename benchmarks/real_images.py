"""The paper's strategies on real images: train each row x seed on the emoji set's latents under one step
budget, score every run with `semroute eval --data`, then write the table, the claims with intervals, a
samples grid and the routing heatmaps.

    python benchmarks/real_images.py --data data/emoji --vae data/emoji-ae --work runs/emoji \\
        --out results/emoji [--rows b1,b2,s1,s2] [--seeds 3] [--steps 500] [--extra-row gemma-s2]

The schemes of released models are rows too: --rows b1,b2,s2,flux2,unifusion,hidream --extra-row granted.

Every step is a `semroute` command run as a subprocess (printed before it runs, so any one can be repeated
by hand). Re-running skips what is done: a run directory that holds its finished results is not touched;
an interrupted training resumes from its newest checkpoint (semroute train does that); a cache already
written is reused. Nothing else is needed: the set from `semroute data emoji`, the autoencoder from
`semroute autoencoder`.

Each finished run's small records (its scores, training summary and config, and for seed 0 its column of
the samples grid; never checkpoints) are copied to OUT/runs/<row>-seed<k>/ as soon as it is scored. Those
records count as finished runs in any later call with the same --out, on this machine or another, with
WORK empty: so a comparison longer than one session goes on where it stopped once OUT is committed.

Layout of --work (runs and caches, large) and --out (results, small enough to commit):
    WORK/runs/<row>-seed<k>/   training run and realbench.json / realbench.png (its held-out scores)
    WORK/cache[-<row>]/        the precomputed latents and text features each kind of row trains on
    results.json, table.md     per-row means and standard deviations, chance, the autoencoder's ceiling,
                               paired-bootstrap claims (pairs: (seed, held-out caption))
    samples.png                the same held-out captions and noise seeds for every row
    routing-<row>.png          learned block x layer weights of seed 0
    commands.txt               every command this script ran, in order
    runs/<row>-seed<k>/        each finished run's records (RECORD_FILES, and grid.png for seed 0)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semroute.bench.ablation import DONE_FILE
from semroute.bench.claims import paired_bootstrap
from semroute.bench.sampling import sample_all
from semroute.checkpoint import RUN_CONFIG_FILE, SUMMARY_FILE, resolve_checkpoint
from semroute.data.cache import CACHE_META
from semroute.fileio import copy_atomic, write_atomic, write_json, write_text
from semroute.pipeline import SemanticRoutingPipeline
from semroute.plots import captioned_grid

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "emoji.yaml"
# Extra rows: a name -> the strategy and the --set overrides that make it.
EXTRA_ROWS = {
    "gemma-s2": (
        "s2",
        ["text_encoder.model=gemma3-270m", 'text_encoder.template="An image of {prompt}"'],
    ),
    # GRAN-TED: B3's learned layer weights frozen after the first quarter of the default 500 steps.
    "granted": ("b3", ["train.freeze_fusion_after=125"]),
}
METRICS = ("fd", "top1", "top5", "attribute")
BETTER = {"fd": "lower", "top1": "higher", "top5": "higher", "attribute": "higher"}
GRID_PROMPTS = 10
RESULTS_FILE = "realbench.json"
# What a finished run is, in small: its scores, its training summary (img/s, precision) and config.
RECORD_FILES = (RESULTS_FILE, SUMMARY_FILE, RUN_CONFIG_FILE, DONE_FILE)
GRID_FILE = "grid.png"  # a seed-0 run's column of samples.png, so the grid is redrawn without its checkpoint


def run(command: list[str], log: Path) -> None:
    line = shlex.join(command)
    print(f"$ {line}", flush=True)
    with log.open("a") as f:
        f.write(line + "\n")
    subprocess.run(command, check=True)


def row_spec(row: str) -> tuple[str, list[str], str]:
    """(strategy, extra --set overrides, cache name) of a row."""
    if row in EXTRA_ROWS:
        strategy, sets = EXTRA_ROWS[row]
        return strategy, sets, f"cache-{row}"
    return row, [], "cache"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="set directory (semroute data emoji --out)")
    parser.add_argument(
        "--vae", type=Path, required=True, help="autoencoder directory (semroute autoencoder)"
    )
    parser.add_argument("--work", type=Path, required=True, help="directory for runs and caches")
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--rows", default="b1,b2,s1,s2", help="strategy ids, comma-separated")
    parser.add_argument("--extra-row", action="append", default=[], choices=sorted(EXTRA_ROWS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--extra-row-seeds", type=int, default=None, help="seeds of the --extra-row rows (default: --seeds)"
    )
    parser.add_argument("--steps", type=int, default=500, help="the one training budget of every run")
    parser.add_argument("--eval-steps", type=int, default=25, help="sampling steps when scoring")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.txt"
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] + args.extra_row
    semroute = [sys.executable, "-m", "semroute"]
    common = [
        "--set",
        f"dataset.manifest={args.data / 'train.jsonl'}",
        "--set",
        f"dataset.vae={args.vae}",
    ]
    started = time.perf_counter()
    for name in carry_in(args.out, args.work):
        print(f"{name}: finished records carried from {args.out / 'runs' / name} (not trained again)")
    extra_seeds = args.seeds if args.extra_row_seeds is None else args.extra_row_seeds
    for seed in range(args.seeds):
        for row in rows:
            if row in EXTRA_ROWS and seed >= extra_seeds:
                continue
            strategy, sets, cache_name = row_spec(row)
            overrides = [*common, "--set", f"model.strategy={strategy}"]
            for item in sets:
                overrides += ["--set", item]
            run_dir = args.work / "runs" / f"{row}-seed{seed}"
            results = run_dir / RESULTS_FILE
            if results.is_file():
                check_run(run_dir, *read_run(run_dir), args.steps, args.eval_steps)  # before training more
                continue
            cache = args.work / cache_name
            if not (cache / CACHE_META).is_file():
                run([*semroute, "precompute", "--config", str(CONFIG), *overrides, "--out", str(cache)], log)
            train_sets = [
                *overrides,
                "--set",
                "dataset.manifest=null",
                "--set",
                f"dataset.cache={cache}",
                "--set",
                f"train.seed={seed}",
            ]
            train = [*semroute, "train", "--config", str(CONFIG), *train_sets, "--max-steps", str(args.steps)]
            run([*train, "--out", str(run_dir)], log)
            run(
                [
                    *semroute,
                    "eval",
                    "--checkpoint",
                    str(run_dir),
                    "--data",
                    str(args.data),
                    "--steps",
                    str(args.eval_steps),
                    "--out",
                    str(results),
                ],
                log,
            )
            if seed == 0:
                routing = args.out / f"routing-{row}.png"
                run([*semroute, "routing", "--checkpoint", str(run_dir), "--out", str(routing)], log)
                grid_column(run_dir, args.data)
            carry_out(run_dir, args.out)
    summary = summarize(args.work, rows, args.seeds, extra_seeds, args.steps, args.eval_steps)
    summary["wall_seconds_this_session"] = round(time.perf_counter() - started)
    write_json(args.out / "results.json", summary)
    write_text(args.out / "table.md", table(summary))
    samples_grid(args.work, args.out, rows, args.data)
    for run_dir in sorted((args.work / "runs").iterdir()):  # grid columns drawn just now, older runs' records
        if (run_dir / RESULTS_FILE).is_file():
            carry_out(run_dir, args.out)
    print(table(summary))


def carry_in(out: Path, work: Path) -> list[str]:
    """Copy the records of runs finished elsewhere (OUT/runs/<run>/) into WORK/runs/<run>/ where WORK has
    no scores for that run, so they count as finished. A run directory WORK already scored is left as it
    is. Returns the runs carried."""
    carried = []
    records = out / "runs"
    for source in sorted(records.iterdir()) if records.is_dir() else []:
        target = work / "runs" / source.name
        if not (source / RESULTS_FILE).is_file() or (target / RESULTS_FILE).is_file():
            continue
        for name in (*RECORD_FILES, GRID_FILE):
            if (source / name).is_file():
                copy_atomic(source / name, target / name)
        carried.append(source.name)
    return carried


def carry_out(run_dir: Path, out: Path) -> None:
    """Copy a scored run's records (and its grid column) to OUT/runs/<run>/."""
    for name in (*RECORD_FILES, GRID_FILE):
        if (run_dir / name).is_file():
            copy_atomic(run_dir / name, out / "runs" / run_dir.name / name)


def grid_prompts(data: Path) -> tuple[list[dict], list[str]]:
    """The held-out rows the samples grid shows (evenly spread), and their captions."""
    from semroute.data.images import read_manifest

    held = read_manifest(data / "heldout.jsonl")
    step = max(1, len(held) // GRID_PROMPTS)
    chosen = held[::step][:GRID_PROMPTS]
    return chosen, [str(r["text"]) for r in chosen]


def grid_column(run_dir: Path, data: Path) -> torch.Tensor:
    """A seed-0 run's images for the grid's captions (noise seed 0), read from RUN/grid.png when there, else
    sampled from its checkpoint and saved there (lossless 8-bit: what the figure shows)."""
    path = run_dir / GRID_FILE
    if path.is_file():
        return load_column(path)
    _, prompts = grid_prompts(data)
    pipeline = SemanticRoutingPipeline.from_checkpoint(resolve_checkpoint(run_dir), device="cpu")
    column = sample_all(pipeline, prompts, 1, seed=0, desc=f"grid {run_dir.name}")
    save_column(column, path)
    return load_column(path)


def save_column(images: torch.Tensor, path: Path) -> None:
    """(N, 3, S, S) images in [0, 1] as one PNG, stacked top to bottom."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square RGB images (N, 3, S, S), got {tuple(images.shape)}")
    pixels = (
        (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(-1, images.shape[3], 3)
    )
    write_atomic(path, lambda tmp: Image.fromarray(pixels.numpy()).save(tmp, format="PNG"))


def load_column(path: Path) -> torch.Tensor:
    """The images `save_column` wrote, (N, 3, S, S) in [0, 1]."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    height, width, _ = pixels.shape
    if height % width:
        raise ValueError(
            f"{path} is {width}x{height}: not a column of square images (save_column writes those)"
        )
    return (
        torch.from_numpy(pixels.copy()).view(height // width, width, width, 3).permute(0, 3, 1, 2).float()
        / 255
    )


def check_run(run_dir: Path, trained: dict, result: dict, steps: int, eval_steps: int | None) -> None:
    """A scored run (trained here or carried; `trained` its summary.json, `result` its realbench.json) must
    have the comparison's one training budget and sampler."""
    sampled = result.get("sampling", {}).get("steps")
    if trained.get("steps") != steps:
        raise ValueError(
            f"{run_dir} trained {trained.get('steps')} steps, not --steps {steps}; give the --steps it was "
            f"made with, or move it (and its records under --out/runs) aside to train it again"
        )
    if eval_steps is not None and sampled != eval_steps:
        raise ValueError(
            f"{run_dir / RESULTS_FILE} was sampled with {sampled} steps, not --eval-steps {eval_steps}; "
            f"delete it (and its copy under --out/runs) to score the run again"
        )


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """A scored run's training summary and held-out scores."""
    return json.loads((run_dir / SUMMARY_FILE).read_text()), json.loads((run_dir / RESULTS_FILE).read_text())


def summarize(
    work: Path, rows: list[str], seeds: int, extra_seeds: int, steps: int, eval_steps: int | None = None
) -> dict:
    runs = work / "runs"
    names = {
        row: [f"{row}-seed{s}" for s in range(extra_seeds if row in EXTRA_ROWS else seeds)] for row in rows
    }
    read = {row: [read_run(runs / n) for n in ns] for row, ns in names.items()}
    trained = {row: [t for t, _ in pairs] for row, pairs in read.items()}
    found = {row: [r for _, r in pairs] for row, pairs in read.items()}
    first = found[rows[0]][0]
    for row, ns in names.items():  # one budget, one sampler, one held-out set: else the rows do not compare
        for name, (summary_of, result) in zip(ns, read[row], strict=True):
            check_run(runs / name, summary_of, result, steps, eval_steps)
            if result["prompts"] != first["prompts"]:
                raise ValueError(
                    f"{runs / name / RESULTS_FILE} scored other held-out captions than {rows[0]}-seed0: the "
                    f"rows must be scored on one --data set"
                )
    summary: dict = {
        "steps": steps,
        "seeds": seeds,
        "held_out_captions": len(first["prompts"]),
        "cpu_capability": ", ".join(
            sorted({str(t.get("cpu_capability")) for ts in trained.values() for t in ts})
        ),
        "chance": first["chance"],
        "ceiling": {m: first["ceiling"][m] for m in METRICS},
        "real_split_half_fd": first["real_split_half_fd"],
        "rows": {},
        "claims": [],
    }
    for row, results in found.items():
        summary["rows"][row] = {
            "train_images_per_s": statistics.fmean(t["images_per_s"] for t in trained[row]),
            "cpu_capability": sorted({t.get("cpu_capability") for t in trained[row]}),
        }
        for metric in METRICS:
            values = [r[metric] for r in results]
            summary["rows"][row][metric] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None,  # one seed: no spread known
                "seeds": values,
            }

    def per_prompt(row: str, metric: str) -> dict[tuple, float]:
        return {
            (seed, i): value
            for seed, r in enumerate(found[row])
            for i, value in enumerate(r["per_prompt"][metric])
            if value is not None
        }

    for row in found:  # is each row above chance at all? (the same bootstrap against a constant)
        for metric in ("top1", "top5", "attribute"):
            scores = per_prompt(row, metric)
            chance = summary["chance"][metric]
            boot = paired_bootstrap(scores, dict.fromkeys(scores, chance))
            low = boot["ci95"][0]
            summary["claims"].append(
                {
                    "a": row,
                    "b": "chance",
                    "metric": metric,
                    **boot,
                    "verdict": "above chance" if low > 0 else "not shown above chance",
                }
            )
    # The paper's pairs, then each released model's scheme against B2 (all layers, mean) and S2 (the best).
    shipped = [(row, base) for row in ("flux2", "unifusion", "hidream", "granted") for base in ("b2", "s2")]
    for a, b in (("s2", "b1"), ("s1", "b1"), ("b2", "b1"), ("s2", "b2"), ("gemma-s2", "s2"), *shipped):
        if a not in found or b not in found:
            continue
        for metric in ("top1", "top5", "attribute"):
            boot = paired_bootstrap(per_prompt(a, metric), per_prompt(b, metric))
            low, high = boot["ci95"]
            verdict = "helps" if low > 0 else "hurts" if high < 0 else "no difference shown"
            summary["claims"].append({"a": a, "b": b, "metric": metric, **boot, "verdict": verdict})
        diffs = [x["fd"] - y["fd"] for x, y in zip(found[a], found[b], strict=False)]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None  # one seed: unknown
        summary["claims"].append({"a": a, "b": b, "metric": "fd", "mean": mean, "se_over_seeds": se})
    return summary


def _mean_sd(score: dict, spec: str) -> str:
    """mean ± sd over seeds; with one seed the spread is unknown and the cell says so."""
    if score["sd"] is None:
        return f"{score['mean']:{spec}} (1 seed)"
    return f"{score['mean']:{spec}} ± {score['sd']:{spec}}"


def table(summary: dict) -> str:
    chance, ceiling = summary["chance"], summary["ceiling"]
    lines = [
        f"Real images (Fluent 3D emoji, {summary['held_out_captions']} held-out captions), "
        f"{summary['steps']} steps x batch 32 per run, {summary['seeds']} seeds, mean ± sd over seeds "
        f"(CPU: {summary['cpu_capability']}).",
        "",
        "| row | seeds | FD (lower is better) | retrieval top-1 | retrieval top-5 | attribute accuracy "
        "| train img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, scores in summary["rows"].items():
        cells = [_mean_sd(scores[m], ".3f") for m in METRICS]
        cells[0] = _mean_sd(scores["fd"], ".1f")
        seeds = len(scores["fd"]["seeds"])
        lines.append(f"| {row} | {seeds} | " + " | ".join(cells) + f" | {scores['train_images_per_s']:.0f} |")
    lines.append(
        f"| chance | | real split-half {summary['real_split_half_fd']:.1f} | {chance['top1']:.3f} | "
        f"{chance['top5']:.3f} | {chance['attribute']:.3f} | |"
    )
    lines.append(
        f"| ceiling (real images through the autoencoder) | | {ceiling['fd']:.1f} | {ceiling['top1']:.3f} | "
        f"{ceiling['top5']:.3f} | {ceiling['attribute']:.3f} | |"
    )
    lines += [
        "",
        "Claims (paired bootstrap over (seed, caption) pairs, 95% intervals; FD: seeds' mean ± se):",
        "",
    ]
    for c in summary["claims"]:
        if c["metric"] == "fd":
            se = c["se_over_seeds"]
            spread = f"± {se:.1f}" if se is not None else "(one seed: no standard error, no claim)"
            lines.append(f"- {c['a']} - {c['b']}, FD: {c['mean']:+.1f} {spread}")
        else:
            lines.append(
                f"- {c['a']} - {c['b']}, {c['metric']}: {100 * c['mean']:+.1f} points, 95% CI "
                f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] over {c['pairs']} pairs: "
                f"{c['verdict']}"
            )
    return "\n".join(lines) + "\n"


def samples_grid(work: Path, out: Path, rows: list[str], data: Path) -> None:
    """The first held-out captions, one image each per row (seed 0 runs, the same noise seeds), beside the
    real image. A row whose seed-0 run has neither its grid column nor its checkpoint here is left out, and
    the figure's title says so."""
    from semroute.bench.realbench import real_images

    chosen, prompts = grid_prompts(data)
    columns = {"real": real_images(chosen, data, 64)}
    missing = []
    for row in rows:
        run_dir = work / "runs" / f"{row}-seed0"
        if not (run_dir / GRID_FILE).is_file() and not (run_dir / "checkpoints").is_dir():
            missing.append(row)
            continue
        columns[row] = grid_column(run_dir, data)
    title = "held-out captions: the real image, then each row (seed 0 runs)"
    if missing:
        print(
            f"samples.png: left out {', '.join(missing)} "
            f"(neither {GRID_FILE} nor a checkpoint of seed 0 is here)"
        )
        title += f"; not here: {', '.join(missing)}"
    captioned_grid(columns, prompts, out / "samples.png", title)


if __name__ == "__main__":
    main()
