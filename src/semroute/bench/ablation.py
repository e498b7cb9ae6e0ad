"""The paper's comparison on this machine: every strategy, same data, budget, seeds and DiT; ShapesBench for each.

Layout of an ablation directory:
    runs/<id>-seed<k>/           training run (checkpoints, log) and shapesbench.json when evaluated
    results.json, table.md, bars.png, routing-<id>.png
Re-running skips every run whose shapesbench.json exists and resumes an interrupted run from its
newest checkpoint, so an interrupted ablation loses at most the steps since that checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..fileio import write_json, write_text
from ..fusion import PAPER_IDS, PAPER_NAMES
from .shapesbench import BENCH_VERSION, CATEGORIES, bench_prompts, run_bench

logger = logging.getLogger(__name__)
RESULTS_FILE = "shapesbench.json"
COLUMNS = (*CATEGORIES, "overall", "fidelity")


def parse_strategies(text: str) -> list[str]:
    """'b1,s2' -> paper ids in the paper's order; unknown ids are an error listing the valid ones."""
    ids = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in ids if s not in PAPER_IDS]
    if unknown or not ids:
        raise ValueError(f"unknown strategies {unknown or text!r}; valid: {', '.join(PAPER_IDS)}")
    return [s for s in PAPER_IDS if s in ids]


def run_ablation(
    base: RunConfig,
    out: Path,
    strategies: list[str],
    seeds: int,
    minutes: float | None,
    images_per_prompt: int,
    max_steps: int | None = None,
    encoder=None,
    progress: bool = True,
    device: str = "auto",
) -> dict:
    """Train and evaluate every (strategy, seed) not done yet, then write the table, plots and claims.

    A run scored by an older ShapesBench version is scored again from its checkpoint (not retrained).
    """
    from ..text_encoder import TextEncoder
    from ..train import train

    from ..data.shapes import ShapesDataset, ShapesTask
    from ..checkpoint import newest_loadable, resume_differences
    from ..runtime import resolve_precision
    from ..features import prompt_table

    prompts = bench_prompts(base.data)
    features = None  # every run shares the data config, so the captions are encoded once
    for seed in range(seeds):
        for sid in strategies:
            run_dir = out / "runs" / f"{sid}-seed{seed}"
            config = copy.deepcopy(base)
            config.model = dataclasses.replace(config.model, strategy=PAPER_IDS[sid])
            config.train.seed = seed
            previous = _read_results(run_dir)
            if previous is not None and previous.get("version") == BENCH_VERSION:
                logger.info("%s seed %d: done, skipped", sid, seed)
                continue
            if previous is not None and Path(previous.get("checkpoint", "")).is_dir():
                # Scored by an older ShapesBench: the same checkpoint is scored again, nothing is retrained.
                logger.info("%s seed %d: scored with %s; scoring its checkpoint with %s", sid, seed, previous.get("version"),
                            BENCH_VERSION)
                _evaluate(Path(previous["checkpoint"]), config, prompts, images_per_prompt, previous["steps"], sid, seed,
                          run_dir, device, progress)
                continue
            if run_dir.exists():
                try:
                    found = newest_loadable(run_dir, config)
                except ValueError:  # unreadable by this version, or every checkpoint damaged: moved aside below
                    found = None
                if found is not None and not resume_differences(found[1], config):
                    logger.info("%s seed %d: resuming the interrupted run from %s", sid, seed, found[0].name)
                else:
                    # Nothing to resume (or made another way): keep it aside rather than delete it, and start again.
                    aside = run_dir.with_name(f"{run_dir.name}.interrupted")
                    n = 0
                    while aside.exists():
                        n += 1
                        aside = run_dir.with_name(f"{run_dir.name}.interrupted{n}")
                    run_dir.rename(aside)
            encoder = encoder or TextEncoder(base.text_encoder)
            if features is None:
                captions = ShapesDataset(ShapesTask(base.data)).captions
                dtype = resolve_precision(base.train.mixed_precision, "cpu" if device == "cpu" else "auto").dtype
                features = prompt_table(encoder, captions, dtype, progress)
            result = train(config, run_dir, max_steps, minutes, progress, encoder, features, device=device)
            _evaluate(result.checkpoint, config, prompts, images_per_prompt, result.steps, sid, seed, run_dir,
                      result.model.device, progress)
    return summarize_ablation(out, strategies, seeds)


def _read_results(run_dir: Path) -> dict | None:
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is not valid JSON; delete it to score that run again") from None


def _evaluate(checkpoint: Path, config: RunConfig, prompts, images_per_prompt: int, steps: int, sid: str, seed: int,
              run_dir: Path, device, progress: bool) -> None:
    """ShapesBench on a run's checkpoint with the config's sampling settings, written to the run's results file."""
    from ..pipeline import SemanticRoutingPipeline

    pipeline = SemanticRoutingPipeline.from_checkpoint(checkpoint, device=device, precision=config.train.mixed_precision)
    s = config.sample
    bench = run_bench(pipeline, prompts, images_per_prompt, s.steps, s.guidance_scale, s.shift, progress=progress)
    bench.update(strategy=sid, seed=seed, steps=steps, checkpoint=str(checkpoint))
    write_json(run_dir / RESULTS_FILE, bench)


def collect(out: Path, strategies: list[str], seeds: int) -> dict[str, list[dict]]:
    """Finished runs' ShapesBench results by strategy id."""
    found: dict[str, list[dict]] = {}
    for sid in strategies:
        for seed in range(seeds):
            result = _read_results(out / "runs" / f"{sid}-seed{seed}")
            if result is None:
                continue
            if result.get("version") != BENCH_VERSION:
                raise ValueError(f"{out}/runs/{sid}-seed{seed} was scored with {result.get('version')}, not {BENCH_VERSION}; "
                                 f"re-run semroute ablate on {out} to score it again")
            found.setdefault(sid, []).append(result)
    return found


def _value(result: dict, column: str) -> float:
    return result[column] if column in ("overall", "fidelity") else result["categories"][column]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_bootstrap(a: dict[tuple, float], b: dict[tuple, float], samples: int = 10000, seed: int = 0) -> dict:
    """Mean of a - b over shared keys (seed, prompt) and a 95% bootstrap interval resampling those pairs."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("no paired results to compare")
    diffs = np.array([a[k] - b[k] for k in keys])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(samples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diffs.mean()), "ci95": [float(low), float(high)], "pairs": len(keys)}


def _per_prompt(results: list[dict], category: str) -> dict[tuple, float]:
    return {
        (r["seed"], p["prompt"]): sum(p["correct"]) / len(p["correct"])
        for r in results
        for p in r["prompts"]
        if p["category"] == category
    }


def claims(found: dict[str, list[dict]]) -> list[dict]:
    """The paper's claims, checked against our numbers (a claim needing a missing strategy is skipped)."""
    out = []
    means = {sid: {c: mean_std([_value(r, c) for r in rs])[0] for c in COLUMNS} for sid, rs in found.items()}
    if "s2" in found and "b1" in found:
        boot = paired_bootstrap(_per_prompt(found["s2"], "counting"), _per_prompt(found["b1"], "counting"))
        out.append({
            "claim": "S2 beats B1 on counting",
            "ours": f"S2 - B1 = {100 * boot['mean']:+.1f} points, 95% CI [{100 * boot['ci95'][0]:+.1f}, "
                    f"{100 * boot['ci95'][1]:+.1f}] over {boot['pairs']} (seed, prompt) pairs",
            "agrees": bool(boot["ci95"][0] > 0),
            "bootstrap": boot,
        })
    for sid, column, extreme, claim, word in (
        ("s2", "overall", max, "S2 is best overall", "best overall"),
        ("s1", "fidelity", min, "S1 has the lowest fidelity", "lowest fidelity"),
    ):
        if len(found) > 1 and sid in found:
            value = extreme(m[column] for m in means.values())
            leaders = [s for s in means if means[s][column] == value]
            names = " = ".join(PAPER_NAMES[s] for s in leaders)
            ours = f"{word}: {names}" + (f" (tied at {100 * value:.1f})" if len(leaders) > 1 else "")
            out.append({"claim": claim, "ours": ours, "agrees": leaders == [sid]})
    return out


def table_markdown(found: dict[str, list[dict]], checked: list[dict]) -> str:
    """Rows in the paper's order, mean +- std over seeds in percent; then the claims."""
    header = "| strategy | seeds | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for sid in PAPER_IDS:
        if sid not in found:
            continue
        cells = []
        for column in COLUMNS:
            mean, std = mean_std([_value(r, column) for r in found[sid]])
            # One seed has no spread to show.
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}" if len(found[sid]) > 1 else f"{100 * mean:.1f}")
        lines.append(f"| {PAPER_NAMES[sid]} | {len(found[sid])} | " + " | ".join(cells) + " |")
    lines += ["", "| paper claim | our numbers | agrees |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['ours']} | {'yes' if c['agrees'] else 'no'} |" for c in checked]
    if not checked:
        lines.append("| (none: these strategies test no claim; each needs S2 with B1, or S1 with others) | | |")
    return "\n".join(lines) + "\n"


def plot_bars(found: dict[str, list[dict]], path: Path) -> None:
    from ..plots import bar_chart

    ids = [s for s in PAPER_IDS if s in found]
    stats = {c: [mean_std([_value(r, c) for r in found[s]]) for s in ids] for c in COLUMNS}
    bar_chart([PAPER_NAMES[s] for s in ids], stats, path, title="ShapesBench: mean ± std over seeds")


def summarize_ablation(out: Path, strategies: list[str], seeds: int) -> dict:
    """Write results.json, table.md, bars.png and the routing plots from the finished runs."""
    from ..dit import SemanticRoutingDiT
    from ..plots import plot_routing

    found = collect(out, strategies, seeds)
    if not found:
        raise ValueError(f"no finished runs under {out / 'runs'}")
    checked = claims(found)
    summary = {
        sid: {c: dict(zip(("mean", "std"), mean_std([_value(r, c) for r in rs]))) for c in COLUMNS}
        | {"seeds": [r["seed"] for r in rs], "steps": [r["steps"] for r in rs]}
        for sid, rs in found.items()
    }
    write_json(out / "results.json", {"summary": summary, "claims": checked, "runs": found})
    write_text(out / "table.md", table_markdown(found, checked))
    plot_bars(found, out / "bars.png")
    for sid in ("s1", "s2", "s3"):
        if sid in found:
            checkpoint = Path(found[sid][0]["checkpoint"])
            model = SemanticRoutingDiT.from_pretrained(checkpoint)
            layers = json.loads((checkpoint / "text_encoder.json").read_text())["resolved_layers"]
            plot_routing(model.fusion, out / f"routing-{sid}.png", layers, title=f"{PAPER_NAMES[sid]}, seed 0")
    return {"summary": summary, "claims": checked}
