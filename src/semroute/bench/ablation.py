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
steps since that checkpoint. `export_records` copies the tables and every finished run's small records
(no checkpoints) elsewhere; their runs/ copied into an ablation directory count as finished there.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import RUN_CONFIG_FILE, SUMMARY_FILE, routed_layers
from ..config import RunConfig, load_config
from ..data.shapes import ShapesDataset, ShapesTask
from ..dit import SemanticRoutingDiT
from ..features import prompt_table
from ..fileio import copy_atomic, read_json, resolve_stored, stored_path, write_json, write_text
from ..fusion import STRATEGY_TABLE, check_strategy
from ..pipeline import SemanticRoutingPipeline
from ..plots import plot_routing
from ..resume import newest_loadable, resume_differences
from ..runtime import resolve_precision
from ..text_encoder import TextEncoder
from ..train import train
from .claims import (
    COLUMNS,
    claims,
    comparisons,
    mean_std,
    plot_bars,
    plot_claims,
    plot_scales,
    score,
    table_markdown,
)
from .rows import ROW_NAMES, VARIANTS
from .shapesbench import BENCH_VERSION, bench_prompts, run_bench

if TYPE_CHECKING:
    from .shapesbench import BenchPrompt

logger = logging.getLogger(__name__)
RESULTS_FILE = "shapesbench.json"


def results_file(scale: float, base_scale: float | None) -> str:
    """A run's results file at one guidance scale: shapesbench.json
    at the config's own, else shapesbench-cfg<g>.json."""
    return RESULTS_FILE if scale == base_scale else f"shapesbench-cfg{scale:g}.json"


def run_ablation(
    base: RunConfig,
    out: Path,
    strategies: list[str],
    seeds: int,
    minutes: float | None,
    images_per_prompt: int,
    max_steps: int | None = None,
    encoder: TextEncoder | None = None,
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
    base_scale = base.sample.guidance_scale
    scales = scales or [base_scale]
    if "s1s" in strategies and gate_shift is None:
        raise ValueError(
            "the s1s row samples S1's checkpoints with a gate shift: pass --gate-shift (e.g. the one "
            "`semroute trajectory` suggests)"
        )
    prompts = bench_prompts(base.data)
    scoring = Scoring(prompts, images_per_prompt, device, progress)
    # Every run shares the data config, so the captions are encoded once per kind of text features (hidden
    # states; deep fusion's keys/values), by one LLM.
    encoders, tables = {}, {}
    trained = sorted({VARIANTS[v].samples or v for v in strategies}, key=list(VARIANTS).index)
    for seed in range(seeds):
        for vid in trained:
            run_dir = out / "runs" / f"{vid}-seed{seed}"
            config = _variant_config(base, vid, seed, max_steps)
            budget = {"max_steps": max_steps or config.train.max_steps, "minutes": minutes}
            if _read_results(run_dir) is not None or _finished_checkpoint(run_dir):
                differences = finished_differences(run_dir, config, budget)
                if differences:
                    raise ValueError(
                        f"{run_dir} was trained another way than this ablation asks: "
                        f"{'; '.join(differences)}; give --out a new directory, or run with the budget and "
                        "config it was made with"
                    )
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
            write_json(
                run_dir / DONE_FILE,
                {
                    "checkpoint": stored_path(result.checkpoint, run_dir),
                    "steps": result.steps,
                    "budget": budget,
                },
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
                    record = _finished_record(source)
                    if record is not None:
                        raise ValueError(
                            f"{source} is here as records only (its checkpoint "
                            f"{resolve_stored(record['checkpoint'], source)} is not): scoring it at guidance "
                            f"scale {scale:g} needs that checkpoint; copy it back, or leave that scale out"
                        )
                    raise ValueError(
                        f"{source} has no finished checkpoint to score; re-run semroute ablate to train it"
                    )
                logger.info("%s seed %d: scoring at guidance scale %g", vid, seed, scale)
                shift = gate_shift if VARIANTS[vid].samples else None
                _evaluate(
                    scoring,
                    done[0],
                    base,
                    steps=done[1],
                    row=vid,
                    seed=seed,
                    scale=scale,
                    gate_shift=shift,
                    path=path,
                )
    return summarize_ablation(out, strategies, seeds, scales, base_scale)


DONE_FILE = "finished.json"  # a run's final checkpoint and step count, written when its training ends


def _variant_config(base: RunConfig, vid: str, seed: int, max_steps: int | None = None) -> RunConfig:
    """The run config of row `vid` and `seed`; max_steps: the run's step budget, if not the config's."""
    variant = VARIANTS[vid]
    config = copy.deepcopy(base)
    config.model = dataclasses.replace(
        config.model,
        strategy=check_strategy(variant.paper_id),
        gate_signal=None if variant.gate_signal == "nominal" else variant.gate_signal,
    )
    kind = STRATEGY_TABLE[config.model.settings()["strategy"]].text_features
    if kind != config.text_encoder.features:  # deep fusion reads keys/values of its default pairing
        config.text_encoder = dataclasses.replace(config.text_encoder, features=None, layers=[])
    config.train.seed = seed
    if variant.freeze_fraction:
        steps = max_steps or config.train.max_steps
        config.train.freeze_fusion_after = max(1, round(variant.freeze_fraction * steps))
    RunConfig.__post_init__(config)  # the variant's model settings checked like a file's
    return config


def _finished_record(run_dir: Path) -> dict | None:
    path = run_dir / DONE_FILE
    if not path.is_file():
        return None
    done = read_json(path, "the finished-run record", f"delete it (or {run_dir}) to train that run again")
    if (
        not isinstance(done, dict)
        or not isinstance(done.get("checkpoint"), str)
        or not isinstance(done.get("steps"), int)
    ):
        raise ValueError(
            f"{path} is not a finished-run record (it needs 'checkpoint' and 'steps'); delete it (or "
            f"{run_dir}) to train that run again"
        )
    return done


def _finished_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    done = _finished_record(run_dir)
    if done is None:
        return None
    checkpoint = resolve_stored(done["checkpoint"], run_dir)
    return (checkpoint, done["steps"]) if checkpoint.is_dir() else None


def _checkpoint_of_results(run_dir: Path) -> tuple[Path, int] | None:
    """Runs scored before finished.json existed: their results name the checkpoint."""
    previous = _read_results(run_dir)
    if previous is not None and isinstance(previous.get("checkpoint"), str):
        checkpoint = resolve_stored(previous["checkpoint"], run_dir)
        if checkpoint.is_dir():
            return checkpoint, previous["steps"]
    return None


def finished_differences(run_dir: Path, config: RunConfig, budget: dict) -> list[str]:
    """How a finished run differs from the one an ablation asks for: its step budget (or, for records that
    predate budgets, its step count) and what a resume must not change in its run config."""
    differences = []
    done = _finished_record(run_dir) or _read_results(run_dir) or {}
    recorded = done.get("budget")
    if isinstance(recorded, dict):
        for key, value in budget.items():
            if recorded.get(key) != value:
                differences.append(f"train budget {key}: run {recorded.get(key)}, now {value}")
    elif budget["minutes"] is None and done.get("steps") != budget["max_steps"]:
        differences.append(f"steps: run {done.get('steps')}, now {budget['max_steps']}")
    saved = run_dir / RUN_CONFIG_FILE
    if saved.is_file():
        differences += resume_differences(load_config(saved), config)
    return differences


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
    found = read_json(path, "the ShapesBench results", "delete it to score that run again")
    if not isinstance(found, dict):
        raise ValueError(f"{path} is not a ShapesBench results object; delete it to score that run again")
    return found


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How every run of an ablation is scored: the prompts, images per prompt, the device, a progress bar."""

    prompts: list[BenchPrompt]
    images_per_prompt: int
    device: str
    progress: bool


def _evaluate(
    scoring: Scoring,
    checkpoint: Path,
    config: RunConfig,
    *,
    steps: int,
    row: str,
    seed: int,
    scale: float,
    gate_shift: float | None,
    path: Path,
) -> None:
    """ShapesBench on a row's checkpoint (trained `steps`) at one guidance scale and the config's other
    sampling settings, written to `path`."""
    pipeline = SemanticRoutingPipeline.from_checkpoint(
        checkpoint, device=scoring.device, precision=config.train.mixed_precision
    )
    if gate_shift is not None:
        pipeline.use_gate_shift(gate_shift)
    sample = config.sample
    bench = run_bench(
        pipeline,
        scoring.prompts,
        scoring.images_per_prompt,
        sample.steps,
        scale,
        sample.shift,
        progress=scoring.progress,
    )
    bench.update(strategy=row, seed=seed, steps=steps, checkpoint=stored_path(checkpoint, path.parent))
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
            run_dir = out / "runs" / f"{sid}-seed{seed}"
            result = _read_results_file(run_dir / name)
            if result is None:
                continue
            if isinstance(result.get("checkpoint"), str):  # stored relative to the run directory
                result["checkpoint"] = str(resolve_stored(result["checkpoint"], run_dir))
            if result.get("version") != BENCH_VERSION:
                raise ValueError(
                    f"{out}/runs/{sid}-seed{seed} was scored with {result.get('version')}, not "
                    f"{BENCH_VERSION}; re-run semroute ablate on {out} to score it again"
                )
            found.setdefault(sid, []).append(result)
    return found


def _plot_routing_of(run: dict, path: Path, name: str) -> None:
    """Draw what the first run of a row learned; a run carried over as records only (its checkpoint not on
    this machine) keeps the figure drawn when it was trained."""
    checkpoint = Path(run["checkpoint"])
    if not checkpoint.is_dir():
        if path.is_file():
            logger.info("%s: kept (its checkpoint %s is not here to redraw it)", path.name, checkpoint)
        else:
            logger.warning(
                "%s not drawn: seed %s's checkpoint %s is not here (records carried without checkpoints)",
                path.name,
                run.get("seed"),
                checkpoint,
            )
        return
    model = SemanticRoutingDiT.from_pretrained(checkpoint)
    plot_routing(
        model.fusion,
        path,
        routed_layers(checkpoint),
        title=f"{name}, seed {run.get('seed', 0)}",
        weights=model.routing_weights(),
    )


# With every shapesbench*.json: what a finished run is, in small (summary.json: its img/s, precision, CPU).
RECORD_FILES = (DONE_FILE, RUN_CONFIG_FILE, SUMMARY_FILE)


def export_records(out: Path, dest: Path) -> list[Path]:
    """Copy an ablation's tables, figures and each finished run's small records (finished.json, its run
    config, training summary and ShapesBench results; never checkpoints or logs) into `dest`, e.g. to commit
    them. Copying `dest/runs` into an ablation directory carries those runs over: `semroute ablate` on it
    trains and scores none of them again. Returns the files written."""
    written = []
    for name in sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix in (".md", ".json", ".png")):
        written.append(copy_atomic(out / name, dest / name))
    for run_dir in sorted((out / "runs").iterdir()):
        if not run_dir.is_dir() or _read_results(run_dir) is None:
            continue  # unfinished, or kept aside (<run>.interrupted): nothing to carry
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and (path.name in RECORD_FILES or path.name.startswith("shapesbench")):
                written.append(copy_atomic(path, dest / "runs" / run_dir.name / path.name))
    return written


def summarize_ablation(
    out: Path,
    strategies: list[str],
    seeds: int,
    scales: list[float] | list[float | None] | None = None,
    base_scale: float | None = None,
) -> dict:
    """Write results.json, table.md, bars.png (and scales.png) and the routing plots from the finished runs.

    With several guidance scales, table.md holds one table and its claims per scale; the returned summary
    and claims are those of the first scale, and "scales" holds each scale's.
    """
    scales = scales or [base_scale]  # None: the config's own scale
    per_scale: dict[Any, dict[str, Any]] = {}
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
                c: dict(zip(("mean", "std"), mean_std([score(r, c) for r in rs]), strict=True))
                for c in COLUMNS
            }
            | {"seeds": [r["seed"] for r in rs], "steps": [r["steps"] for r in rs]}
            for sid, rs in found.items()
        }
        per_scale[scale] = {
            "summary": summary,
            "claims": checked,
            "runs": found,
            "comparisons": comparisons(found),
        }
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
    for sid in ("fusedit", "s1", "s1e", "s2", "s3", "s3e", "flux2", "unifusion", "granted"):
        if sid in first["runs"]:
            _plot_routing_of(first["runs"][sid][0], out / f"routing-{sid}.png", ROW_NAMES[sid])
    result = {"summary": first["summary"], "claims": first["claims"], "comparisons": first["comparisons"]}
    if len(scales) > 1:
        result["scales"] = {g: {"summary": v["summary"], "claims": v["claims"]} for g, v in per_scale.items()}
    return result
