"""What each `semroute` command does once its arguments are parsed (imported only then: it loads torch)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import transformers

from ..autoencoder import settings_of, train_autoencoder
from ..base import ABLATION_CONFIG, DEMO_CONFIG, NOT_LEARNED_EXIT, QUICK_MINUTES, packaged_config
from ..bench import bench_prompts, run_bench
from ..bench.ablation import export_records, run_ablation
from ..bench.public import read_prompts, sample_bench
from ..bench.realbench import VERSION as REALBENCH_VERSION
from ..bench.realbench import run_realbench, sampling_record
from ..bench.rows import parse_strategies
from ..bench.sampling import sample_all
from ..bench.trajectory import plot_trajectory, trace
from ..checkpoint import RUN_CONFIG_FILE, resolve_checkpoint, routed_layers
from ..config import RunConfig, load_config
from ..data.cache import convert_cache
from ..data.emoji import build_emoji_set
from ..demo import run_demo
from ..fileio import OutputLock, entries, read_json, write_json
from ..loading import export_pipeline, load_transformer
from ..pipeline import load_pipeline
from ..plots import captioned_grid, plot_routing, save_sample_grid
from ..precompute import plan_cache, precompute
from ..runtime import process_state
from ..train import train

if TYPE_CHECKING:
    import torch

    from ..pipeline import SemanticRoutingPipeline

logger = logging.getLogger("semroute")


def _config_for(
    path: Path | None,
    sets: list[str],
    precision: str | None = None,
    default: str = "",
    extra: tuple[str, ...] = (),
) -> RunConfig:
    """The run config of --config (or a packaged default)
    with --set and the flags that override config keys."""
    overrides = [*sets, *extra] + ([f"train.mixed_precision={precision}"] if precision is not None else [])
    return load_config(path or packaged_config(default), overrides)


def _writer(out: Path) -> AbstractContextManager:
    """The lock that makes this process the only writer of the directory `out` (the main one of an
    accelerate launch); its file lives inside `out`."""
    # The launcher's RANK, read without setting up accelerate's state (each command does that its own way).
    return OutputLock(out) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()


def _sampling_pipeline(args: argparse.Namespace, checkpoint: Path | None = None) -> SemanticRoutingPipeline:
    """The pipeline of --checkpoint on --device in --precision, sampling with --scheduler if given."""
    pipeline = load_pipeline(
        checkpoint or args.checkpoint,
        text_encoder=args.text_encoder,
        device=_process_device(args.device),
        precision=args.precision,
    )
    if args.scheduler is not None:
        pipeline.use_scheduler(args.scheduler)
    if args.gate_shift is not None:
        pipeline.use_gate_shift(args.gate_shift)
    pipeline.compile = getattr(args, "compile", "off")  # commands that trace single calls never compile
    return pipeline


def cmd_train(args: argparse.Namespace) -> None:
    report = (f"train.report_to={args.report_to}",) if args.report_to else ()
    config = _config_for(args.config, args.set, args.precision, extra=report)
    out = args.out or Path("runs") / args.config.stem
    with _writer(out):
        result = train(config, out, max_steps=args.max_steps, minutes=args.minutes, device=args.device)
    print(
        f"trained {result.steps} steps, loss {result.final_loss:.4f}, {result.images_per_s:.0f} img/s; "
        f"checkpoint {result.checkpoint}"
    )


GRID_PROMPTS = 12  # eval --data draws the first prompts' images (at most 4 each)
MAX_GRID_IMAGES = 256  # `sample` draws one PNG grid; more images belong in sample-bench's folders


def cmd_sample(args: argparse.Namespace) -> None:
    if args.n > MAX_GRID_IMAGES:
        raise ValueError(
            f"--n {args.n}: sample draws one grid of at most {MAX_GRID_IMAGES} images; for more, write them "
            f"as files with sample-bench"
        )
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {args.out}")
    pipeline = _sampling_pipeline(args)
    # In batches, so that a large --n never holds more than one batch of activations; image k from seed + k.
    images = sample_all(
        pipeline,
        [args.prompt],
        args.n,
        steps=args.steps,
        guidance_scale=args.cfg,
        shift=args.shift,
        seed=args.seed,
        batch_size=32,
        desc=f"sampling {args.n} images",
    )
    settings = pipeline.sampling(args.steps, args.cfg, args.shift)
    save_sample_grid(
        images,
        [args.prompt or "(unconditional)"],
        args.n,
        args.out,
        title=f"{args.checkpoint} cfg {settings.guidance_scale}",
    )
    print(f"wrote {args.out}")


def cmd_routing(args: argparse.Namespace) -> None:
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_transformer(checkpoint)
    plot_routing(
        model.fusion,
        args.out,
        routed_layers(checkpoint),
        title=str(checkpoint),
        weights=model.routing_weights(),
    )
    print(f"wrote {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    checkpoint = resolve_checkpoint(args.checkpoint)
    if args.data is not None:
        return _eval_real(args, checkpoint)
    if args.limit is not None:
        raise ValueError(
            "--limit applies to --data (a real-image set); ShapesBench always scores every prompt"
        )
    out = args.out or checkpoint / "shapesbench.json"
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out must be a .json file, got {out}")
    config = load_config(checkpoint / RUN_CONFIG_FILE)
    pipeline = _sampling_pipeline(args, checkpoint)
    n = args.n or config.sample.images_per_prompt
    scales = args.cfg or [None]
    every = {}
    for scale in scales:
        results = run_bench(pipeline, bench_prompts(config.data), n, args.steps, scale, args.shift, args.seed)
        results["checkpoint"] = str(checkpoint)
        every[results["sampling"]["guidance_scale"]] = results
        summary = {k: round(v, 4) for k, v in results["categories"].items()}
        print(
            json.dumps(
                {
                    "guidance_scale": results["sampling"]["guidance_scale"],
                    **summary,
                    "overall": round(results["overall"], 4),
                    "fidelity": round(results["fidelity"], 4),
                }
            )
        )
    # One scale: the results themselves; several: {"scales": {"1.5": results, ...}} in one file.
    document = (
        results
        if len(scales) == 1
        else {
            "version": results["version"],
            "checkpoint": str(checkpoint),
            "scales": {f"{g:g}": r for g, r in every.items()},
        }
    )
    _refuse_other_results(out, document)
    write_json(out, document)
    print(f"wrote {out}")


def _eval_real(args: argparse.Namespace, checkpoint: Path) -> None:
    out = args.out or checkpoint / "realbench.json"
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out must be a .json file, got {out}")
    if args.cfg is not None and len(args.cfg) > 1:
        raise ValueError("--data scores one guidance scale at a time; give --cfg one value")
    pipeline = _sampling_pipeline(args, checkpoint)
    guidance_scale = args.cfg[0] if args.cfg else None
    planned = {
        "version": REALBENCH_VERSION,
        "images_per_prompt": args.n or 1,
        "sampling": sampling_record(pipeline, args.steps, guidance_scale, args.shift),
        "checkpoint": str(checkpoint),
        "data": str(args.data),
        "seed": args.seed,
        "limit": args.limit,
    }
    _refuse_other_results(out, planned, tuple(planned))  # before sampling, not after
    results = run_realbench(
        pipeline,
        args.data,
        images_per_prompt=planned["images_per_prompt"],
        steps=args.steps,
        guidance_scale=guidance_scale,
        shift=args.shift,
        seed=args.seed,
        limit=args.limit,
    )
    generated = results.pop("generated")
    results.update(checkpoint=str(checkpoint), limit=args.limit)
    write_json(out, results)
    shown = min(len(results["prompts"]), GRID_PROMPTS)
    n = results["images_per_prompt"]
    by_prompt = generated[: shown * n].view(shown, n, *generated.shape[1:])
    grid = captioned_grid(
        {f"image {k + 1}": by_prompt[:, k] for k in range(min(n, 4))},
        results["prompts"][:shown],
        out.with_suffix(".png"),
        title=str(checkpoint),
    )
    chance, ceiling = results["chance"], results["ceiling"]
    attribute = "n/a" if results["attribute"] is None else f"{results['attribute']:.3f}"
    print(
        f"FD {results['fd']:.1f} (real split-half {results['real_split_half_fd']:.1f}, autoencoder ceiling "
        f"{ceiling['fd']:.1f}); top-1 {results['top1']:.3f} (chance {chance['top1']:.3f}, ceiling "
        f"{ceiling['top1']:.3f}); top-5 {results['top5']:.3f} (chance {chance['top5']:.3f}); attribute "
        f"{attribute} (chance {chance['attribute']:.3f}, over {results['attribute_prompts']} captions)"
    )
    print(f"wrote {out} and {grid}")


RESULT_KEYS = ("version", "images_per_prompt", "sampling", "checkpoint", "scales")


def _refuse_other_results(out: Path, results: dict, keys: tuple[str, ...] = RESULT_KEYS) -> None:
    """An existing results file of other settings is never overwritten (the same settings re-score it)."""
    if not out.exists():
        return

    found = read_json(out, "results file", "move it away or pass another --out")
    if "scales" in results:  # several scales: the settings of each
        found = (
            {**found, "scales": _settings_by_scale(found.get("scales"))} if isinstance(found, dict) else found
        )
        results = {**results, "scales": _settings_by_scale(results["scales"])}
    differences = [k for k in keys if not isinstance(found, dict) or found.get(k) != results.get(k)]
    if differences:
        raise ValueError(
            f"{out} holds results of other settings ({', '.join(differences)} differ); pass another --out"
        )


def cmd_trajectory(args: argparse.Namespace) -> None:
    checkpoint = resolve_checkpoint(args.checkpoint)
    prompts = (
        args.prompt
        or [p.text for p in bench_prompts(load_config(checkpoint / RUN_CONFIG_FILE).data)][
            : args.prompts_limit
        ]
    )
    pipeline = _sampling_pipeline(args, checkpoint)
    scales = args.cfg or [pipeline.sampling().guidance_scale]
    with _writer(args.out):
        result = trace(pipeline, prompts, args.n, scales, args.steps, args.seed)
        result.update(
            checkpoint=str(checkpoint),
            prompts=prompts,
            images_per_prompt=args.n,
            gate_shift=pipeline.sampling().gate_shift,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(
            args.out / "trajectory.json",
            {**result, "scales": {f"{g:g}": v for g, v in result["scales"].items()}},
        )
        fusion = pipeline.transformer.fusion
        gates = "estimated" if pipeline.transformer.noise_head is not None else "nominal"
        plot_trajectory(
            result,
            args.out / "trajectory.png",
            title=f"{checkpoint}\n{fusion.strategy} ({gates} gates), {len(prompts)} prompts x {args.n}, "
            f"{len(result['t'])} steps",
        )
    for scale, entry in result["scales"].items():
        name = next(iter(entry["levels"]))
        worst = max(range(len(result["t"])), key=lambda k: abs(entry["levels"][name][k] - result["t"][k]))
        print(
            f"CFG {scale:g}: effective level {entry['levels'][name][worst]:.3f} at nominal t "
            f"{result['t'][worst]:.3f} (largest gap, {name}); "
            + (
                f"gate shift that fits best: {entry['suggested_gate_shift']:.2f}"
                if entry["suggested_gate_shift"] is not None
                else f"no gate shift can be fitted: {entry['no_gate_shift_because']}"
            )
        )
    print(f"wrote {args.out}/trajectory.png and trajectory.json")


def _settings_by_scale(scales: list[float] | None) -> dict | None:
    if not isinstance(scales, dict):
        return None
    return {
        g: (r.get("images_per_prompt"), r.get("sampling")) if isinstance(r, dict) else None
        for g, r in scales.items()
    }


def cmd_ablate(args: argparse.Namespace) -> None:
    strategies = parse_strategies(args.strategies)
    base = _config_for(args.config, args.set, args.precision, ABLATION_CONFIG)
    seeds, minutes, n = args.seeds, args.minutes_per_run, args.n
    if args.quick:
        seeds, minutes, n = 1, QUICK_MINUTES, 2
    with _writer(args.out):
        result = run_ablation(
            base,
            args.out,
            strategies,
            seeds,
            minutes,
            n,
            max_steps=args.max_steps,
            device=args.device,
            scales=args.cfg,
            gate_shift=args.gate_shift,
        )
    print((args.out / "table.md").read_text())
    plots = ", ".join(
        name for name in ("bars.png", "scales.png", "claims.png") if (args.out / name).is_file()
    )
    print(
        f"wrote {args.out}/table.md, results.json, {plots}; claims agree: "
        f"{sum(c['agrees'] for c in result['claims'])}/{len(result['claims'])}"
    )
    if args.export is not None:
        with _writer(args.export):
            written = export_records(args.out, args.export)
        print(f"copied {len(written)} files (tables, figures, run records; no checkpoints) to {args.export}")


def cmd_data(args: argparse.Namespace) -> None:
    with _writer(args.out):
        summary = build_emoji_set(args.out, args.tarball)
    print(
        f"wrote {summary['images']} captioned images to {args.out}: {summary['train']} for training "
        f"({args.out / 'train.jsonl'}), {summary['held_out']} held out ({args.out / 'heldout.jsonl'}); "
        f"train on it with dataset: {{manifest: {args.out / 'train.jsonl'}}}"
    )


def cmd_autoencoder(args: argparse.Namespace) -> None:
    settings = settings_of(args)
    with _writer(args.out):
        report = train_autoencoder(args.train, args.heldout, args.out, settings)
    line = (
        f"saved the autoencoder ({report['parameters'] / 1e6:.2f} M parameters, latents "
        f"{report['latent_shape']})"
    )
    held = report.get("heldout")
    if held:
        line += (
            f"; held-out PSNR {held['psnr_db']:.2f} dB (resized to the latent grid: "
            f"{held['reference_resized_psnr_db']:.2f}), FD {held['fd']:.1f} (resized: "
            f"{held['reference_resized_fd']:.1f}, real split-half: {held['real_split_half_fd']:.1f})"
        )
    print(f"{line}; use it with dataset: {{vae: {args.out}}}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cmd_precompute(args: argparse.Namespace) -> None:
    config = _config_for(args.config, args.set)
    if args.dry_run:
        plan = plan_cache(config, args.dtype, args.device)
        tokens = plan["tokens"]
        print(
            f"{plan['rows']} rows (image, caption) in {plan['dtype']}: "
            f"{_size(plan['bytes'])} ({_size(plan['latent_bytes_per_row'])} of latents per row, "
            f"{_size(plan['bytes_per_token'])} per text token; prompts of {tokens['mean']:.1f} tokens on "
            f"average, {tokens['p90']:.0f} at p90, {tokens['max']} at most, {tokens['at_max_length']} cut at "
            f"max_length {plan['max_length']}). Padded to max_length it would take "
            f"{_size(plan['padded_bytes'])} ({plan['bytes'] / plan['padded_bytes']:.2f}x). Nothing written."
        )
        return
    with _writer(args.out):
        meta = precompute(
            config,
            args.out,
            shard_size=args.shard_size,
            dtype=args.dtype,
            batch_size=args.batch_size,
            device=args.device,
        )
    if meta is not None:
        print(
            f"cached {meta['rows']} rows in {len(meta['shards'])} shards ({len(meta['skipped'])} images "
            f"skipped) in {args.out}; train on it with dataset: {{cache: {args.out}}}"
        )


def cmd_sample_bench(args: argparse.Namespace) -> None:
    prompts = read_prompts(args.bench, args.prompts)[: args.limit]
    pipeline = _sampling_pipeline(args)
    with _writer(args.out):
        report = sample_bench(
            pipeline,
            args.bench,
            prompts,
            args.out,
            args.n,
            args.steps,
            args.cfg,
            args.shift,
            args.seed,
            args.batch_size,
        )
    if report is not None:
        print(
            f"{report['written']} images written, {report['already_there']} already there, "
            f"{report['prompts']} prompts x {report['images_per_prompt']} in {args.out}"
        )


def _process_device(spec: str) -> str | torch.device:
    """--device, except that under `accelerate launch` `auto` means this process's own device."""
    state = process_state(spec)
    return state.device if spec == "auto" and state.num_processes > 1 else spec


def cmd_export(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"{args.out} exists and is not a directory; choose a new directory")
    with _writer(args.out):  # the lock inside --out: any other writer of it (train, another export) waits
        if entries(args.out):
            raise ValueError(f"{args.out} exists and is not empty; choose a new directory")
        export_pipeline(load_pipeline(args.checkpoint, device="cpu"), args.out)
    print(
        f"wrote a diffusers pipeline to {args.out}; load it with "
        f"SemanticRoutingPipeline.from_pretrained({str(args.out)!r})"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    config = _config_for(args.config, args.set, args.precision, DEMO_CONFIG)
    with _writer(args.out):
        metrics, verdict = run_demo(
            config, args.out, max_steps=args.max_steps, minutes=args.minutes, device=args.device
        )
    print(
        json.dumps(
            {
                k: round(metrics[k], 4)
                for k in ("count_accuracy", "colour_accuracy", "shape_accuracy", "exact_accuracy")
            }
        )
    )
    print(verdict.text())
    print(f"wrote {args.out / 'samples.png'}, {args.out / 'routing.png'}, {args.out / 'metrics.json'}")
    return 0 if verdict.learned else NOT_LEARNED_EXIT


def cmd_convert_cache(args: argparse.Namespace) -> None:
    with _writer(args.cache):
        before = sum(p.stat().st_size for p in args.cache.glob("*.safetensors"))
        meta = convert_cache(args.cache)
    after = sum(p.stat().st_size for p in args.cache.glob("*.safetensors"))
    print(f"{args.cache}: {meta['rows']} rows stored ragged, {_size(before)} -> {_size(after)}")


def cmd_serve(args: argparse.Namespace) -> None:
    from ..web import serve  # gradio is an optional extra: imported only here

    serve(args.checkpoint, args.device, args.precision, args.host, args.port, args.max_images)


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "routing": cmd_routing,
    "eval": cmd_eval,
    "ablate": cmd_ablate,
    "data": cmd_data,
    "autoencoder": cmd_autoencoder,
    "precompute": cmd_precompute,
    "convert-cache": cmd_convert_cache,
    "sample-bench": cmd_sample_bench,
    "export": cmd_export,
    "demo": cmd_demo,
    "trajectory": cmd_trajectory,
    "serve": cmd_serve,
}


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="semroute: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every model load
