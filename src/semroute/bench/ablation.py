"""The paper's comparison on this machine: every strategy with the same data, budget, seeds and DiT, each
scored on ShapesBench.

Rows are the paper's strategies (b1..s3, and its deep-fusion baseline fusedit, which reads each paired LLM
layer's keys/values instead of hidden states) and the trajectory-aware variants of its time gates: s1e / s3e
(gates read a noise level estimated from x_t, trained so) and s1s (S1's checkpoints sampled with a gate
shift, no retraining). Every run is scored at each guidance scale asked for.

Layout of an ablation directory:
    runs/<id>-seed<k>/           training run (checkpoints, log) and its ShapesBench results:
                                 shapesbench.json at the config's guidance scale,
                                 shapesbench-cfg<g>.json at any other scale g
    results.json, table.md, bars.png, scales.png and claims.png (several scales), routing-<id>.png
Re-running skips every (run, scale) already scored, scores new scales from the saved checkpoints, and
resumes an interrupted run from its newest checkpoint, so an interrupted ablation loses at most the
steps since that checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import statistics
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..fileio import write_json, write_text
from ..fusion import PAPER_IDS, PAPER_NAMES, STRATEGY_TABLE
from .shapesbench import BENCH_VERSION, CATEGORIES, bench_prompts, run_bench

logger = logging.getLogger(__name__)
RESULTS_FILE = "shapesbench.json"
COLUMNS = (*CATEGORIES, "overall", "fidelity")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: a paper strategy, what its time gates read, and whether it is trained or only sampled
    differently."""

    name: str
    paper_id: str  # the strategy (b1..s3, fusedit)
    gate_signal: str = "nominal"
    samples: str | None = None  # sampling-only: the row whose checkpoints it samples (with the gate shift)


# In the order of the tables: each gate variant follows its nominal strategy.
VARIANTS: dict[str, Variant] = {
    **{sid: Variant(PAPER_NAMES[sid], sid) for sid in ("b1", "b2", "b3", "fusedit", "s1")},
    "s1s": Variant("S1 time-wise, shifted gate", "s1", samples="s1"),
    "s1e": Variant("S1 time-wise, estimated gate", "s1", gate_signal="estimated"),
    "s2": Variant(PAPER_NAMES["s2"], "s2"),
    "s3": Variant(PAPER_NAMES["s3"], "s3"),
    "s3e": Variant("S3 joint, estimated gate", "s3", gate_signal="estimated"),
}
ROW_NAMES = {vid: v.name for vid, v in VARIANTS.items()}


def parse_strategies(text: str) -> list[str]:
    """'b1,s2' -> row ids in the table's order; unknown ids are an error listing the valid ones."""
    ids = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in ids if s not in VARIANTS]
    if unknown or not ids:
        raise ValueError(
            f"unknown strategies {unknown or text!r}; valid: {', '.join(PAPER_IDS)} "
            f"(the paper's), {', '.join(v for v in VARIANTS if v not in PAPER_IDS)} (gate variants)"
        )
    return [s for s in VARIANTS if s in ids]


def parse_scales(text: str) -> list[float]:
    """'1.5,3,5,7' -> guidance scales (each >= 1, no repeats)."""
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"guidance scales must be numbers separated by commas, e.g. 1.5,3,5,7; got {text!r}"
        ) from None
    if not scales or any(not math.isfinite(g) or g < 1 for g in scales) or len(set(scales)) != len(scales):
        raise ValueError(
            f"guidance scales must be distinct finite numbers >= 1 (1 disables guidance), got {text!r}"
        )
    return scales


def results_file(scale: float, base_scale: float) -> str:
    """A run's results file at one guidance scale: shapesbench.json at the config's own, else
    shapesbench-cfg<g>.json."""
    return RESULTS_FILE if scale == base_scale else f"shapesbench-cfg{scale:g}.json"


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
    scales: list[float] | None = None,
    gate_shift: float | None = None,
) -> dict:
    """Train and evaluate every (row, seed) not done yet at every guidance scale, then write tables, plots and
    claims.

    strategies: row ids (`VARIANTS`). scales: guidance scales to score every run at (default: the config's).
    gate_shift: the gate shift of the s1s row (required with it). A run scored by an older ShapesBench version
    is scored again from its checkpoint (not retrained).
    """
    from ..checkpoint import newest_loadable, resume_differences
    from ..data.shapes import ShapesDataset, ShapesTask
    from ..features import prompt_table
    from ..runtime import resolve_precision
    from ..text_encoder import TextEncoder
    from ..train import train

    base_scale = base.sample.guidance_scale
    scales = scales or [base_scale]
    if "s1s" in strategies and gate_shift is None:
        raise ValueError(
            "the s1s row samples S1's checkpoints with a gate shift: pass --gate-shift (e.g. the one "
            "`semroute trajectory` suggests)"
        )
    prompts = bench_prompts(base.data)
    # Every run shares the data config, so the captions are encoded once per kind of text features (hidden
    # states; deep fusion's keys/values), by one LLM.
    encoders, tables = {}, {}
    trained = sorted({VARIANTS[v].samples or v for v in strategies}, key=list(VARIANTS).index)
    for seed in range(seeds):
        for vid in trained:
            run_dir = out / "runs" / f"{vid}-seed{seed}"
            config = _variant_config(base, vid, seed)
            if _read_results(run_dir) is not None or _finished_checkpoint(run_dir):
                continue
            if run_dir.exists():
                try:
                    found = newest_loadable(run_dir, config)
                except (
                    ValueError
                ):  # unreadable by this version, or every checkpoint damaged: moved aside below
                    found = None
                if found is not None and not resume_differences(found[1], config):
                    logger.info("%s seed %d: resuming the interrupted run from %s", vid, seed, found[0].name)
                else:
                    _move_aside(run_dir)
            encoder = encoder or TextEncoder(base.text_encoder)
            kind = config.text_encoder.features
            if kind not in tables:
                encoders[kind] = TextEncoder(
                    config.text_encoder, model=encoder.model, tokenizer=encoder.tokenizer
                )
                captions = ShapesDataset(ShapesTask(base.data)).captions
                dtype = resolve_precision(
                    base.train.mixed_precision, "cpu" if device == "cpu" else "auto"
                ).dtype
                tables[kind] = prompt_table(encoders[kind], captions, dtype, progress)
            result = train(
                config, run_dir, max_steps, minutes, progress, encoders[kind], tables[kind], device=device
            )
            (run_dir / DONE_FILE).write_text(
                json.dumps({"checkpoint": str(result.checkpoint), "steps": result.steps})
            )
        for vid in strategies:
            source = out / "runs" / f"{VARIANTS[vid].samples or vid}-seed{seed}"
            done = _finished_checkpoint(source) or _checkpoint_of_results(source)
            for scale in scales:
                run_dir = out / "runs" / f"{vid}-seed{seed}"
                path = run_dir / results_file(scale, base_scale)
                previous = _read_results_file(path)
                if previous is not None and previous.get("version") == BENCH_VERSION:
                    continue
                if done is None:
                    raise ValueError(
                        f"{source} has no finished checkpoint to score; re-run semroute ablate to train it"
                    )
                logger.info("%s seed %d: scoring at guidance scale %g", vid, seed, scale)
                shift = gate_shift if VARIANTS[vid].samples else None
                _evaluate(
                    done[0],
                    base,
                    prompts,
                    images_per_prompt,
                    done[1],
                    vid,
                    seed,
                    path,
                    device,
                    progress,
                    scale,
                    shift,
                )
    return summarize_ablation(out, strategies, seeds, scales, base_scale)


DONE_FILE = "finished.json"  # a run's final checkpoint and step count, written when its training ends


def _variant_config(base: RunConfig, vid: str, seed: int) -> RunConfig:
    variant = VARIANTS[vid]
    config = copy.deepcopy(base)
    config.model = dataclasses.replace(
        config.model,
        strategy=PAPER_IDS[variant.paper_id],
        gate_signal=None if variant.gate_signal == "nominal" else variant.gate_signal,
    )
    kind = STRATEGY_TABLE[config.model.strategy].text_features
    if kind != config.text_encoder.features:  # deep fusion reads keys/values of its default pairing
        config.text_encoder = dataclasses.replace(config.text_encoder, features=None, layers=[])
    config.train.seed = seed
    RunConfig.__post_init__(config)  # the variant's model settings checked like a file's
    return config


def _finished_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    path = run_dir / DONE_FILE
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return (Path(done["checkpoint"]), done["steps"]) if Path(done["checkpoint"]).is_dir() else None


def _checkpoint_of_results(run_dir: Path) -> tuple[Path, int] | None:
    """Runs scored before finished.json existed: their results name the checkpoint."""
    previous = _read_results(run_dir)
    if previous is not None and Path(previous.get("checkpoint", "")).is_dir():
        return Path(previous["checkpoint"]), previous["steps"]
    return None


def _move_aside(run_dir: Path) -> None:
    """Nothing to resume (or made another way): keep it aside rather than delete it, and start again."""
    aside = run_dir.with_name(f"{run_dir.name}.interrupted")
    n = 0
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.interrupted{n}")
    run_dir.rename(aside)


def _read_results(run_dir: Path) -> dict | None:
    return _read_results_file(run_dir / RESULTS_FILE)


def _read_results_file(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is not valid JSON; delete it to score that run again") from None


def _evaluate(
    checkpoint: Path,
    config: RunConfig,
    prompts,
    images_per_prompt: int,
    steps: int,
    vid: str,
    seed: int,
    path: Path,
    device,
    progress: bool,
    scale: float,
    gate_shift: float | None,
) -> None:
    """ShapesBench on a run's checkpoint at one guidance scale (the config's other sampling settings)."""
    from ..pipeline import SemanticRoutingPipeline

    pipeline = SemanticRoutingPipeline.from_checkpoint(
        checkpoint, device=device, precision=config.train.mixed_precision
    )
    if gate_shift is not None:
        pipeline.use_gate_shift(gate_shift)
    s = config.sample
    bench = run_bench(pipeline, prompts, images_per_prompt, s.steps, scale, s.shift, progress=progress)
    bench.update(strategy=vid, seed=seed, steps=steps, checkpoint=str(checkpoint))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, bench)


def collect(
    out: Path, strategies: list[str], seeds: int, scale: float | None = None, base_scale: float | None = None
) -> dict[str, list[dict]]:
    """Finished runs' ShapesBench results by row id, at one guidance scale (default: the config's own)."""
    name = RESULTS_FILE if scale is None or scale == base_scale else results_file(scale, base_scale)
    found: dict[str, list[dict]] = {}
    for sid in strategies:
        for seed in range(seeds):
            result = _read_results_file(out / "runs" / f"{sid}-seed{seed}" / name)
            if result is None:
                continue
            if result.get("version") != BENCH_VERSION:
                raise ValueError(
                    f"{out}/runs/{sid}-seed{seed} was scored with {result.get('version')}, not "
                    f"{BENCH_VERSION}; re-run semroute ablate on {out} to score it again"
                )
            found.setdefault(sid, []).append(result)
    return found


def _value(result: dict, column: str) -> float:
    return result[column] if column in ("overall", "fidelity") else result["categories"][column]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_bootstrap(
    a: dict[tuple, float], b: dict[tuple, float], samples: int = 10000, seed: int = 0
) -> dict:
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


def _per_prompt_all(results: list[dict]) -> dict[tuple, float]:
    return {
        (r["seed"], p["category"], p["prompt"]): sum(p["correct"]) / len(p["correct"])
        for r in results
        for p in r["prompts"]
    }


# A fidelity loss across seeds: the mean difference is below 0 by more than this many standard errors.
LOSS_SE = 2


def _seed_differences(a: list[dict], b: list[dict], column: str) -> dict:
    """a - b of one column, paired by seed: mean, its standard error over seeds, and whether it is below 0 by
    LOSS_SE SE."""
    by_seed = {r["seed"]: _value(r, column) for r in b}
    diffs = [_value(r, column) - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
    if not diffs:
        raise ValueError("no seeds in common")
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return {"mean": mean, "se": se, "seeds": len(diffs), "loss": mean + LOSS_SE * se < 0}


def _bootstrap_text(difference: str, boot: dict) -> str:
    return (
        f"{difference} = {100 * boot['mean']:+.1f} points, 95% CI [{100 * boot['ci95'][0]:+.1f}, "
        f"{100 * boot['ci95'][1]:+.1f}] over {boot['pairs']} (seed, prompt) pairs"
    )


def claims(found: dict[str, list[dict]]) -> list[dict]:
    """The paper's claims and the gate variants' targets, checked against our numbers (one needing a missing
    row is skipped)."""
    out = []
    means = {sid: {c: mean_std([_value(r, c) for r in rs])[0] for c in COLUMNS} for sid, rs in found.items()}
    paper_rows = {sid: m for sid, m in means.items() if sid in PAPER_IDS}
    if "s2" in found and "b1" in found:
        boot = paired_bootstrap(_per_prompt(found["s2"], "counting"), _per_prompt(found["b1"], "counting"))
        out.append(
            {
                "claim": "S2 beats B1 on counting",
                "ours": _bootstrap_text("S2 - B1", boot),
                "agrees": bool(boot["ci95"][0] > 0),
                "bootstrap": boot,
            }
        )
    for sid, column, extreme, claim, word in (
        ("s2", "overall", max, "S2 is best overall", "best overall"),
        ("s1", "fidelity", min, "S1 has the lowest fidelity", "lowest fidelity"),
    ):
        if len(paper_rows) > 1 and sid in paper_rows:
            value = extreme(m[column] for m in paper_rows.values())
            leaders = [s for s in paper_rows if paper_rows[s][column] == value]
            names = " = ".join(ROW_NAMES[s] for s in leaders)
            ours = f"{word} of the paper's rows: {names}" + (
                f" (tied at {100 * value:.1f})" if len(leaders) > 1 else ""
            )
            out.append({"claim": claim, "ours": ours, "agrees": leaders == [sid]})
    if (
        "fusedit" in found and "b1" in found
    ):  # the paper: GenEval 60.95 against B1's 64.54, the lowest of its table
        boot = paired_bootstrap(_per_prompt_all(found["fusedit"]), _per_prompt_all(found["b1"]))
        out.append(
            {
                "claim": "FuseDiT deep scores below B1 overall",
                "ours": _bootstrap_text("FuseDiT - B1", boot),
                "agrees": bool(boot["ci95"][1] < 0),
                "bootstrap": boot,
            }
        )
    # The gate variants' targets: fidelity against B2 (a loss: below by more than 2 standard errors over
    # seeds).
    for sid in ("s1", "s1s", "s1e"):
        if sid in found and "b2" in found:
            d = _seed_differences(found[sid], found["b2"], "fidelity")
            out.append(
                {
                    "claim": f"{ROW_NAMES[sid]} loses fidelity against B2",
                    "ours": f"{ROW_NAMES[sid]} - B2 = {100 * d['mean']:+.1f} ± {100 * d['se']:.1f} (SE over "
                    f"{d['seeds']} seeds)",
                    "agrees": d["loss"],
                    "difference": d,
                }
            )
    if "s3e" in found and "s2" in found:
        boot = paired_bootstrap(_per_prompt_all(found["s3e"]), _per_prompt_all(found["s2"]))
        out.append(
            {
                "claim": "S3 with estimated gates matches or beats S2 overall",
                "ours": _bootstrap_text("S3e - S2", boot),
                "agrees": bool(boot["ci95"][1] >= 0),
                "bootstrap": boot,
            }
        )
    return out


def table_markdown(found: dict[str, list[dict]], checked: list[dict]) -> str:
    """Rows in the paper's order (gate variants after their strategy), mean +- std over seeds in percent; then
    the claims."""
    header = "| strategy | seeds | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for sid in VARIANTS:
        if sid not in found:
            continue
        cells = []
        for column in COLUMNS:
            mean, std = mean_std([_value(r, column) for r in found[sid]])
            # One seed has no spread to show.
            cells.append(
                f"{100 * mean:.1f} ± {100 * std:.1f}" if len(found[sid]) > 1 else f"{100 * mean:.1f}"
            )
        lines.append(f"| {ROW_NAMES[sid]} | {len(found[sid])} | " + " | ".join(cells) + " |")
    lines += ["", "| paper claim | our numbers | agrees |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['ours']} | {'yes' if c['agrees'] else 'no'} |" for c in checked]
    if not checked:
        lines.append(
            "| (none: these strategies test no claim; each needs S2 with B1, or S1 with others) | | |"
        )
    return "\n".join(lines) + "\n"


def plot_bars(found: dict[str, list[dict]], path: Path, title: str | None = None) -> None:
    from ..plots import bar_chart

    ids = [s for s in VARIANTS if s in found]
    stats = {c: [mean_std([_value(r, c) for r in found[s]]) for s in ids] for c in COLUMNS}
    bar_chart([ROW_NAMES[s] for s in ids], stats, path, title=title or "ShapesBench: mean ± std over seeds")


def summarize_ablation(
    out: Path,
    strategies: list[str],
    seeds: int,
    scales: list[float] | None = None,
    base_scale: float | None = None,
) -> dict:
    """Write results.json, table.md, bars.png (and scales.png) and the routing plots from the finished runs.

    With several guidance scales, table.md holds one table and its claims per scale; the returned summary
    and claims are those of the first scale, and "scales" holds each scale's.
    """
    from ..dit import SemanticRoutingDiT
    from ..plots import plot_routing

    scales = scales or [base_scale]
    per_scale = {}
    for scale in scales:
        found = collect(out, strategies, seeds, scale, base_scale)
        if not found:
            raise ValueError(
                f"no finished runs under {out / 'runs'}"
                + (f" scored at guidance scale {scale:g}" if scale else "")
            )
        checked = claims(found)
        summary = {
            sid: {
                c: dict(zip(("mean", "std"), mean_std([_value(r, c) for r in rs]), strict=True))
                for c in COLUMNS
            }
            | {"seeds": [r["seed"] for r in rs], "steps": [r["steps"] for r in rs]}
            for sid, rs in found.items()
        }
        per_scale[scale] = {"summary": summary, "claims": checked, "runs": found}
    first = per_scale[scales[0]]
    if len(scales) == 1:
        write_json(out / "results.json", first)
        write_text(out / "table.md", table_markdown(first["runs"], first["claims"]))
    else:
        write_json(out / "results.json", {"scales": {f"{g:g}": v for g, v in per_scale.items()}})
        write_text(
            out / "table.md",
            "\n".join(
                f"## Guidance scale {g:g}\n\n" + table_markdown(v["runs"], v["claims"])
                for g, v in per_scale.items()
            ),
        )
        plot_scales({g: v["summary"] for g, v in per_scale.items()}, out / "scales.png")
        plot_claims({g: v["claims"] for g, v in per_scale.items()}, out / "claims.png")
    plot_bars(
        first["runs"],
        out / "bars.png",
        title=f"ShapesBench at guidance scale {scales[0]:g}: mean ± std over seeds" if scales[0] else None,
    )
    for sid in ("fusedit", "s1", "s1e", "s2", "s3", "s3e"):
        if sid in first["runs"]:
            checkpoint = Path(first["runs"][sid][0]["checkpoint"])
            model = SemanticRoutingDiT.from_pretrained(checkpoint)
            layers = json.loads((checkpoint / "text_encoder.json").read_text())["resolved_layers"]
            plot_routing(model.fusion, out / f"routing-{sid}.png", layers, title=f"{ROW_NAMES[sid]}, seed 0")
    result = {"summary": first["summary"], "claims": first["claims"]}
    if len(scales) > 1:
        result["scales"] = {g: {"summary": v["summary"], "claims": v["claims"]} for g, v in per_scale.items()}
    return result


def plot_scales(summaries: dict[float, dict], path: Path) -> None:
    """Fidelity and overall score of every row against the guidance scale (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(summaries)
    rows = [sid for sid in VARIANTS if all(sid in summaries[g] for g in scales)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, column in zip(axes, ("fidelity", "overall"), strict=True):
        for sid in rows:
            mean = [100 * summaries[g][sid][column]["mean"] for g in scales]
            std = [100 * summaries[g][sid][column]["std"] for g in scales]
            ax.errorbar(
                scales,
                mean,
                yerr=std,
                marker="o",
                capsize=3,
                label=ROW_NAMES[sid],
                linestyle="--" if VARIANTS[sid].paper_id != sid else "-",
            )
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(f"{column} (%)")
        ax.set_xticks(scales)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ShapesBench against the guidance scale (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def claim_interval(claim: dict) -> tuple[float, float, float] | None:
    """A claim's difference and the interval it is judged by, in points: the paired bootstrap's 95% CI, or
    mean ± LOSS_SE standard errors over seeds. None for a claim that is a ranking, not a difference."""
    if "bootstrap" in claim:
        boot = claim["bootstrap"]
        return 100 * boot["mean"], 100 * boot["ci95"][0], 100 * boot["ci95"][1]
    if "difference" in claim:
        d = claim["difference"]
        return 100 * d["mean"], 100 * (d["mean"] - LOSS_SE * d["se"]), 100 * (d["mean"] + LOSS_SE * d["se"])
    return None


def plot_claims(per_scale: dict[float, list[dict]], path: Path) -> None:
    """One panel per claim that is a difference: its value and interval against the guidance scale, with 0
    marked."""
    from ..plots import interval_panels

    panels: dict[str, list[tuple[float, float, float, float]]] = {}
    for scale in sorted(per_scale):
        for claim in per_scale[scale]:
            interval = claim_interval(claim)
            if interval is not None:
                panels.setdefault(claim["claim"], []).append((scale, *interval))
    if panels:
        interval_panels(
            panels,
            path,
            "guidance scale",
            "difference (points)",
            f"Claims as differences: paired bootstrap 95% CI, or mean ± {LOSS_SE} SE over seeds",
        )
