"""What an ablation's scores say: mean and spread over seeds, the paper's claims with their intervals
(paired bootstrap over prompts, or standard errors over seeds), and the table and figures that show them."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from ..plots import bar_chart, interval_panels, plt, save_figure
from .rows import COLUMNS, PAPER_ROWS, RELEASED_ROWS, ROW_NAMES, VARIANTS


def score(result: dict, column: str) -> float:
    """A result's score in one column (a category, overall or fidelity)."""
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
    """a - b of one column, paired by seed: mean, its standard
    error over seeds, and whether it is below 0 by LOSS_SE SE."""
    by_seed = {r["seed"]: score(r, column) for r in b}
    diffs = [score(r, column) - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
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
    """The paper's claims and the gate variants' targets, checked
    against our numbers (one needing a missing row is skipped)."""
    out = []
    means = {sid: {c: mean_std([score(r, c) for r in rs])[0] for c in COLUMNS} for sid, rs in found.items()}
    paper_rows = {sid: m for sid, m in means.items() if sid in PAPER_ROWS}  # not the released schemes
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


# The schemes of released models, each set against the paper's plain mean of all layers (B2) and its best
# (S2).
BASELINES = ("b2", "s2")
COMPARED = ("overall", "counting")


def comparisons(found: dict[str, list[dict]]) -> list[dict]:
    """Each released model's scheme minus B2 and minus S2, in overall (every prompt) and counting: a paired
    bootstrap over (seed, prompt) and a plain verdict (better / worse where the 95% interval excludes 0, else
    no difference shown). Rows missing from `found` are skipped."""
    out = []
    for sid in RELEASED_ROWS:
        for base in BASELINES:
            if sid not in found or base not in found:
                continue
            for column in COMPARED:
                if column == "overall":
                    a, b = _per_prompt_all(found[sid]), _per_prompt_all(found[base])
                else:
                    a, b = _per_prompt(found[sid], column), _per_prompt(found[base], column)
                boot = paired_bootstrap(a, b)
                low, high = boot["ci95"]
                verdict = "better" if low > 0 else "worse" if high < 0 else "no difference shown"
                out.append(
                    {
                        "row": sid,
                        "baseline": base,
                        "column": column,
                        "ours": _bootstrap_text(f"{ROW_NAMES[sid]} - {ROW_NAMES[base]}", boot),
                        "verdict": verdict,
                        "bootstrap": boot,
                    }
                )
    return out


def table_markdown(found: dict[str, list[dict]], checked: list[dict]) -> str:
    """Rows in the paper's order (gate variants after their
    strategy), mean +- std over seeds in percent; then the claims."""
    header = "| strategy | seeds | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for sid in VARIANTS:
        if sid not in found:
            continue
        cells = []
        for column in COLUMNS:
            mean, std = mean_std([score(r, column) for r in found[sid]])
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
    compared = comparisons(found)
    if compared:
        lines += [
            "",
            "| released scheme against the paper's rows | column | difference | verdict |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c['row']} vs {c['baseline']} | {c['column']} | {c['ours']} | {c['verdict']} |"
            for c in compared
        ]
    return "\n".join(lines) + "\n"


def plot_bars(found: dict[str, list[dict]], path: Path, title: str | None = None) -> None:
    ids = [s for s in VARIANTS if s in found]
    stats = {c: [mean_std([score(r, c) for r in found[s]]) for s in ids] for c in COLUMNS}
    bar_chart([ROW_NAMES[s] for s in ids], stats, path, title=title or "ShapesBench: mean ± std over seeds")


def plot_scales(summaries: dict[float, dict], path: Path) -> None:
    """Fidelity and overall score of every row against the guidance scale (mean ± std over seeds)."""
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
    save_figure(fig, path, "ShapesBench against the guidance scale (mean ± std over seeds)")


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
    """One panel per claim that is a difference: its value
    and interval against the guidance scale, with 0 marked."""
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
