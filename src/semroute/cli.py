"""`semroute` command line: train, sample, routing, eval, trajectory, ablate, precompute, sample-bench,
export, demo."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from importlib import resources
from pathlib import Path

from .fileio import write_json

logger = logging.getLogger("semroute")
# runtime.PRECISIONS, repeated here so that --help never imports torch (a test keeps them equal).
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")  # speed.COMPILE_CHOICES (a test keeps them equal)
DEMO_CONFIG = "demo.yaml"
ABLATION_CONFIG = "ablation.yaml"
QUICK_MINUTES = 1.5
NOT_LEARNED_EXIT = 4  # demo.NOT_LEARNED_EXIT (a test keeps them equal)


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package (configs/ in the repository links to them)."""
    return Path(str(resources.files("semroute") / "configs" / name))


INT_LIMIT = 2**31 - 1  # config.INT_LIMIT (not imported: --help stays light)


def _number(text: str, kind: type):
    """An int or a finite float from a flag; inf, nan and integers past INT_LIMIT are typos, not values."""
    value = kind(text)
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if kind is int and abs(value) > INT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {INT_LIMIT:,}, got {text:.40}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be in 0..{INT_LIMIT}, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _guidance(text: str) -> float:
    value = _number(text, float)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (1 disables guidance), got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _runtime_arguments(
    parser: argparse.ArgumentParser, precision_default: str | None = "auto", train: bool = False
):
    group = parser.add_argument_group("device and precision")
    group.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, mps" + ("" if train else ", or cuda:N"),
    )
    group.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=precision_default,
        help=("default: train.mixed_precision of the config. " if precision_default is None else "")
        + "auto picks bf16 only where it is measured faster than fp32 on this machine (timed once, cached), "
        "fp16 with loss scaling on GPUs without bf16, else fp32",
    )
    return group


def _guidance_list(text: str) -> list[float]:
    values = [_guidance(part) for part in text.split(",") if part.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"must be distinct scales separated by commas, e.g. 1.5,3,5,7; got {text!r}"
        )
    return values


def _sampling_arguments(
    parser: argparse.ArgumentParser,
    n_help: str,
    n_default: int | None,
    seed_help: str,
    several_scales: bool = False,
    batched: bool = True,
):
    """batched: the command samples through the batched sampler, which can compile the DiT (--compile)."""
    group = parser.add_argument_group(
        "sampling (defaults: the checkpoint's own sample: settings, saved when it was trained)"
    )
    group.add_argument("--n", type=_positive_int, default=n_default, help=n_help)
    group.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="scheduler steps (default: the checkpoint's sample.steps)",
    )
    if several_scales:
        group.add_argument(
            "--cfg",
            type=_guidance_list,
            default=None,
            help="classifier-free guidance scale, or several separated by commas (1.5,3,5,7) to score "
            "each from the same checkpoint (default: the checkpoint's sample.guidance_scale)",
        )
    else:
        group.add_argument(
            "--cfg",
            type=_guidance,
            default=None,
            help="classifier-free guidance scale (default: the checkpoint's sample.guidance_scale)",
        )
    group.add_argument(
        "--shift",
        type=_positive_float,
        default=None,
        help="timestep shift of the schedule (default: the checkpoint's sample.shift)",
    )
    group.add_argument(
        "--scheduler",
        default=None,
        help="a diffusers flow-matching scheduler class, e.g. FlowMatchHeunDiscreteScheduler "
        "(default: the checkpoint's sample.scheduler)",
    )
    group.add_argument(
        "--gate-shift",
        type=_positive_float,
        default=None,
        help="time gates (strategies time, joint) read shift_time(t, this) instead of t: the paper's "
        "manual repair, no retraining (default: the checkpoint's sample.gate_shift, 1 = nominal)",
    )
    group.add_argument("--seed", type=_seed, default=0, help=seed_help)
    if batched:
        group.add_argument(
            "--compile",
            choices=COMPILE_CHOICES,
            default="auto",
            help="run the DiT blocks compiled (torch.compile): auto where the job's own timed steps "
            "show that it pays back its compile cost, on, or off (default: auto)",
        )
    group.add_argument(
        "--text-encoder",
        default=None,
        help="the LLM to load instead of the path stored in a semroute checkpoint (the same model moved)",
    )
    return group


def _set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set model.strategy=depth --set train.lr=3e-4 "
        "(repeatable; values read as YAML and checked like the file's)",
    )


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="semroute",
        description="Train and sample text-to-image DiTs whose text conditioning is a per-block routed mix "
        "of LLM layers.",
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a DiT from a YAML config",
        formatter_class=fmt,
        description="Trains on the shapes task, or on config.dataset (a manifest, a saved HF dataset or a "
        "precomputed cache). If --out already holds a checkpoint the run resumes from it exactly; "
        "a config that changes the model, encoder, data or optimiser is refused. For several GPUs: "
        "accelerate launch -m semroute train --config ...",
    )
    p.add_argument("--config", type=Path, required=True, help="YAML run config (see configs/)")
    _set_argument(p)
    p.add_argument(
        "--report-to",
        choices=("none", "tensorboard", "wandb"),
        default=None,
        help="also send the logged metrics to this accelerate tracker (default: train.report_to of the "
        "config)",
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<config name>)")
    budget = p.add_argument_group("budget (overrides train.max_steps / train.minutes)")
    budget.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps")
    budget.add_argument(
        "--minutes", type=_positive_float, default=None, help="stop after this many minutes of training"
    )
    _runtime_arguments(p, precision_default=None, train=True)

    p = sub.add_parser("sample", help="generate images for a prompt", formatter_class=fmt)
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint directory, run directory (its newest good checkpoint) "
        "or exported pipeline directory",
    )
    p.add_argument("--prompt", required=True, help="text prompt (empty string = unconditional)")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG grid")
    _sampling_arguments(
        p, n_help="number of images", n_default=8, seed_help="noise seed (image k uses seed + k)"
    )
    _runtime_arguments(p)

    p = sub.add_parser("routing", help="plot the learned block x LLM-layer weights", formatter_class=fmt)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory or run directory")
    p.add_argument("--out", type=Path, required=True, help="output PNG")

    p = sub.add_parser(
        "eval",
        help="score a checkpoint on ShapesBench (counting, colour, two objects, position)",
        formatter_class=fmt,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory or run directory")
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: <checkpoint>/shapesbench.json)"
    )
    _sampling_arguments(
        p,
        n_help="images per prompt (default: the checkpoint's sample.images_per_prompt)",
        n_default=None,
        seed_help="base noise seed (image k of prompt i uses seed + 1000 i + k)",
        several_scales=True,
    )
    _runtime_arguments(p)

    p = sub.add_parser(
        "trajectory",
        help="measure how far guided sampling's noise level drifts from the nominal t the time gates read",
        formatter_class=fmt,
        description="Samples ShapesBench prompts (or --prompt) at each guidance scale, estimates the "
        "effective noise level of x_t at every step (least-squares fits named on the figure) and plots it "
        "against the nominal t. Writes trajectory.png and trajectory.json to --out, and prints the gate "
        "shift whose shifted t best matches the effective level at each scale (for ablate --gate-shift).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory or run directory")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a prompt to trace (repeatable; default: ShapesBench's)",
    )
    p.add_argument("--prompts-limit", type=_positive_int, default=16, help="ShapesBench prompts to trace")
    _sampling_arguments(
        p,
        n_help="images per prompt",
        n_default=2,
        seed_help="base noise seed",
        several_scales=True,
        batched=False,
    )
    _runtime_arguments(p)

    p = sub.add_parser(
        "ablate",
        help="train and ShapesBench every strategy with the same budget and seeds",
        formatter_class=fmt,
        description="Trains each strategy for each seed with one budget, scores it on ShapesBench and writes "
        "table.md, results.json, bars.png and routing plots to --out (with several --cfg scales, also "
        "scales.png and claims.png). Re-running skips finished runs.",
    )
    p.add_argument("--out", type=Path, required=True, help="ablation directory")
    p.add_argument(
        "--config", type=Path, default=None, help=f"base run config (default: the packaged {ABLATION_CONFIG})"
    )
    _set_argument(p)
    p.add_argument(
        "--strategies",
        default="b1,b2,b3,s1,s2,s3",
        help="rows, comma-separated: the paper ids b1..s3 and fusedit (FuseDiT deep fusion: each block "
        "attends over its LLM layer's own keys/values), and the gate variants s1e / s3e (time gates read a "
        "noise level estimated from x_t) and s1s (S1's checkpoints sampled with --gate-shift)",
    )
    p.add_argument(
        "--cfg",
        type=_guidance_list,
        default=None,
        help="guidance scales to score every run at, comma-separated, e.g. 1.5,3,5,7 (default: the config's "
        "sample.guidance_scale); a new scale is scored from the saved checkpoints, nothing retrained",
    )
    p.add_argument(
        "--gate-shift",
        type=_positive_float,
        default=None,
        help="the gate shift of the s1s row (S1 sampled with its gates reading shift_time(t, this))",
    )
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds per strategy")
    p.add_argument(
        "--minutes-per-run",
        type=_positive_float,
        default=None,
        help="training budget per run (default: train.minutes of the config)",
    )
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="stop each run after this many steps (default: train.max_steps of the config; 1200 in "
        f"{ABLATION_CONFIG}, the smallest budget measured to separate strategies)",
    )
    p.add_argument("--n", type=_positive_int, default=4, help="ShapesBench images per prompt")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 seed, {QUICK_MINUTES:g}-minute runs, 2 images per prompt",
    )
    _runtime_arguments(p, precision_default=None, train=True)

    p = sub.add_parser(
        "precompute",
        help="encode a dataset once: VAE latents + LLM features into safetensors shards",
        formatter_class=fmt,
        description="Runs the VAE and the LLM once over config.dataset (a manifest or a saved HF dataset). "
        "Train on the result with dataset.cache: DIR; later epochs then never touch either model. Re-running "
        "resumes at the missing shards; a directory made another way is refused. Under "
        "`accelerate launch -m semroute precompute ...` the processes share out the shards.",
    )
    p.add_argument(
        "--config", type=Path, required=True, help="run config whose dataset: names a manifest or hf_dataset"
    )
    _set_argument(p)
    p.add_argument("--out", type=Path, required=True, help="cache directory")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="storage precision of latents and features; auto: the dtype train.mixed_precision resolves to "
        "on this machine (a run in another precision converts on reading)",
    )
    p.add_argument("--shard-size", type=_positive_int, default=1024, help="rows per safetensors shard")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per VAE / LLM batch")
    p.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"
    )

    p = sub.add_parser(
        "sample-bench",
        help="sample GenEval / GenAI-Bench / DrawBench prompts into their scorers' folder layouts",
        formatter_class=fmt,
        description="Writes images for a public benchmark's prompts in the layout its own scorer reads (see "
        "semroute.bench.public). Re-running skips images already written. Under "
        "`accelerate launch -m semroute sample-bench ...` the processes share out the batches; the "
        "files are those one process writes.",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="semroute checkpoint, run directory or diffusers pipeline directory",
    )
    p.add_argument(
        "--bench", choices=("geneval", "genaibench", "drawbench"), required=True, help="benchmark layout"
    )
    p.add_argument(
        "--prompts",
        type=Path,
        required=True,
        help="your copy of the prompt file: GenEval evaluation_metadata.jsonl, GenAI-Bench genai_image.json, "
        "or a DrawBench CSV with columns Prompt,Category",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N prompts")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per sampling batch")
    _sampling_arguments(
        p,
        n_help="images per prompt (GenEval uses 4)",
        n_default=4,
        seed_help="base noise seed (image k of prompt i uses seed + 1000 i + k)",
    )
    _runtime_arguments(p)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a diffusers pipeline directory (from_pretrained-loadable)",
        formatter_class=fmt,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory or run directory")
    p.add_argument("--out", type=Path, required=True, help="new pipeline directory")

    p = sub.add_parser(
        "demo",
        help="train S2 on shapes with SmolLM2, then write samples, routing, metrics and a verdict",
        formatter_class=fmt,
        description="Trains the packaged demo recipe for a fixed number of steps (the same result on every "
        "machine; the time is estimated after the first steps), samples 4 images of each of the 72 captions, "
        "scores them and says whether the model learned to count against the 25% chance level. "
        f"Exit code {NOT_LEARNED_EXIT}: the model did not learn. Re-running with the same --out resumes "
        "from the newest checkpoint.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    p.add_argument(
        "--config", type=Path, default=None, help=f"run config (default: the packaged {DEMO_CONFIG})"
    )
    _set_argument(p)
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="training steps (default: train.max_steps of the config)",
    )
    p.add_argument(
        "--minutes",
        type=_positive_float,
        default=None,
        help="also stop training after this many minutes (a time box: a slow machine then learns less)",
    )
    _runtime_arguments(p, precision_default=None, train=True)
    return parser


def _config_for(
    path: Path | None,
    sets: list[str],
    precision: str | None = None,
    default: str | None = None,
    extra: tuple[str, ...] = (),
):
    """The run config of --config (or a packaged default) with --set and the flags that override config
    keys."""
    from .config import load_config

    overrides = [*sets, *extra] + ([f"train.mixed_precision={precision}"] if precision is not None else [])
    return load_config(path or packaged_config(default), overrides)


def _writer(out: Path):
    """The lock that makes this process the only writer of `out` (the main one of an accelerate launch)."""
    import os
    from contextlib import nullcontext

    from .fileio import OutputLock

    # The launcher's RANK, read without setting up accelerate's state (each command does that its own way).
    return OutputLock(out) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()


def _sampling_pipeline(args, checkpoint: Path | None = None):
    """The pipeline of --checkpoint on --device in --precision, sampling with --scheduler if given."""
    from .pipeline import load_pipeline

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


def cmd_train(args) -> None:
    from .train import train

    report = (f"train.report_to={args.report_to}",) if args.report_to else ()
    config = _config_for(args.config, args.set, args.precision, extra=report)
    out = args.out or Path("runs") / args.config.stem
    with _writer(out):
        result = train(config, out, max_steps=args.max_steps, minutes=args.minutes, device=args.device)
    print(
        f"trained {result.steps} steps, loss {result.final_loss:.4f}, {result.images_per_s:.0f} img/s; "
        f"checkpoint {result.checkpoint}"
    )


MAX_GRID_IMAGES = 256  # `sample` draws one PNG grid; more images belong in sample-bench's folders


def cmd_sample(args) -> None:
    from .bench.sampling import sample_all
    from .plots import save_sample_grid

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


def cmd_routing(args) -> None:
    from .checkpoint import resolve_checkpoint
    from .pipeline import load_transformer
    from .plots import plot_routing

    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_transformer(checkpoint)
    layers = json.loads((checkpoint / "text_encoder.json").read_text())["resolved_layers"]
    plot_routing(model.fusion, args.out, layers, title=str(checkpoint))
    print(f"wrote {args.out}")


def cmd_eval(args) -> None:
    from .bench import bench_prompts, run_bench
    from .checkpoint import RUN_CONFIG_FILE, resolve_checkpoint
    from .config import load_config

    checkpoint = resolve_checkpoint(args.checkpoint)
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


def _refuse_other_results(out: Path, results: dict) -> None:
    """An existing results file of other settings is never overwritten (the same settings re-score it)."""
    if not out.exists():
        return
    from .fileio import read_json

    found = read_json(out, "results file", "move it away or pass another --out")
    keys = ("version", "images_per_prompt", "sampling", "checkpoint", "scales")
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


def cmd_trajectory(args) -> None:
    from .bench import bench_prompts
    from .bench.trajectory import plot_trajectory, trace
    from .checkpoint import RUN_CONFIG_FILE, resolve_checkpoint
    from .config import load_config

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
            f"{result['t'][worst]:.3f} (largest gap, {name}); gate shift that fits best: "
            f"{entry['suggested_gate_shift']:.2f}"
        )
    print(f"wrote {args.out}/trajectory.png and trajectory.json")


def _settings_by_scale(scales) -> dict | None:
    if not isinstance(scales, dict):
        return None
    return {
        g: (r.get("images_per_prompt"), r.get("sampling")) if isinstance(r, dict) else None
        for g, r in scales.items()
    }


def cmd_ablate(args) -> None:
    from .bench.ablation import parse_strategies, run_ablation

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


def cmd_precompute(args) -> None:
    from .data.cache import precompute

    config = _config_for(args.config, args.set)
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


def cmd_sample_bench(args) -> None:
    from .bench.public import read_prompts, sample_bench

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


def _process_device(spec: str):
    """--device, except that under `accelerate launch` `auto` means this process's own device."""
    from .runtime import process_state

    state = process_state(spec)
    return state.device if spec == "auto" and state.num_processes > 1 else spec


def cmd_export(args) -> None:
    from .pipeline import export_pipeline, load_pipeline

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ValueError(f"{args.out} exists and is not empty (or not a directory); choose a new directory")
    with _writer(args.out):
        export_pipeline(load_pipeline(args.checkpoint, device="cpu"), args.out)
    print(
        f"wrote a diffusers pipeline to {args.out}; load it with "
        f"SemanticRoutingPipeline.from_pretrained({str(args.out)!r})"
    )


def cmd_demo(args) -> int:
    from .demo import run_demo

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


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "routing": cmd_routing,
    "eval": cmd_eval,
    "ablate": cmd_ablate,
    "precompute": cmd_precompute,
    "sample-bench": cmd_sample_bench,
    "export": cmd_export,
    "demo": cmd_demo,
    "trajectory": cmd_trajectory,
}


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="semroute: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every model load


OUT_OF_MEMORY = (
    "ran out of memory; lower train.batch_size (or raise gradient_accumulation_steps), the model size, "
    "--n or --batch-size; checkpoints already written are intact"
)


# What CUDA, MPS and torch's CPU allocator say when an allocation fails.
MEMORY_PHRASES = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        code = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"semroute: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permissions, a full or read-only disk: nothing already written is touched
        from .checkpoint import OutputError

        if isinstance(err, OutputError):
            print(f"semroute: error: {err}", file=sys.stderr)
            return 2
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"semroute: error: {err.strerror or err}{where}; check the free space and permissions of the "
            "output directory, or choose another one",
            file=sys.stderr,
        )
        return 2
    except MemoryError:
        print(f"semroute: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .checkpoint import TrainingDiverged

        if isinstance(err, TrainingDiverged):
            print(f"semroute: training stopped: {err}", file=sys.stderr)
            return 3
        if any(phrase in str(err).lower() for phrase in MEMORY_PHRASES):
            print(f"semroute: error: {OUT_OF_MEMORY} ({' '.join(str(err).split())[:160]})", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("semroute: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from .checkpoint import TrainingStopped

        if not isinstance(err, TrainingStopped):
            raise
        print(f"semroute: {err}", file=sys.stderr)
        return 128 + err.signum
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
