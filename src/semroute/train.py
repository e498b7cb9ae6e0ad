"""Training on the shapes task: one step for every strategy, built on accelerate."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import RunConfig
from .data.shapes import ShapesDataset, caption
from .dit import SemanticRoutingDiT
from .flow import RectifiedFlow
from .pipeline import NULL_PROMPT, TEXT_ENCODER_FILE, VAE_FILE, PromptFeatures, SemanticRoutingPipeline, encode_prompts
from .plots import save_sample_grid
from .text_encoder import TextEncoder

logger = logging.getLogger(__name__)
RUN_CONFIG_FILE = "run_config.yaml"
TRAINING_STATE_DIR = "training_state"


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    final_loss: float
    images_per_s: float
    skipped_images: int = 0  # missing or unreadable images of a real dataset
    model: SemanticRoutingDiT | None = None  # the trained (non-EMA) weights of this process


def build_optimizer(model: SemanticRoutingDiT, config: RunConfig) -> torch.optim.AdamW:
    """AdamW with the fusion gates in their own groups, scaled so that logits move at about `fusion_lr` per step."""
    t = config.train
    fusion_ids = {id(p) for p in model.fusion.parameters()}
    rest = [p for p in model.parameters() if id(p) not in fusion_ids]
    groups = [{"params": rest, "lr": t.lr}, *model.fusion.optimizer_groups(t.fusion_lr)]
    return torch.optim.AdamW(groups, betas=tuple(t.betas), weight_decay=t.weight_decay)


def warmup_schedule(warmup_steps: int):
    """Linear warmup to the base LR, then constant (the paper's constant LR)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def save_checkpoint(
    directory: Path,
    model: SemanticRoutingDiT,
    ema: EMAModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: RunConfig,
    encoder: TextEncoder,
    vae_path: str | None = None,
) -> Path:
    """Write a checkpoint atomically: EMA weights + config (what sampling loads) and the training state.

    Layout: config.json + diffusion_pytorch_model.safetensors (EMA weights, diffusers format),
    text_encoder.json, run_config.yaml, training_state/{model.safetensors, ema.safetensors,
    optimizer.pt, state.json}.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        model.save_pretrained(tmp)
        ema.restore(model.parameters())
        state_dir = tmp / TRAINING_STATE_DIR
        state_dir.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, state_dir / "model.safetensors")
        save_file({str(i): p.contiguous() for i, p in enumerate(ema.shadow_params)}, state_dir / "ema.safetensors")
        torch.save(optimizer.state_dict(), state_dir / "optimizer.pt")
        (state_dir / "state.json").write_text(json.dumps({"step": step, "ema_optimization_step": ema.optimization_step}))
        # The layers as configured (empty = all) and as resolved for this model.
        (tmp / TEXT_ENCODER_FILE).write_text(json.dumps({**encoder.config.to_dict(), "resolved_layers": encoder.layers}, indent=2))
        config.save(tmp / RUN_CONFIG_FILE)
        if vae_path is not None:
            (tmp / VAE_FILE).write_text(json.dumps({"path": str(vae_path)}))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_raw_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The non-EMA training weights of a checkpoint."""
    return load_file(checkpoint / TRAINING_STATE_DIR / "model.safetensors")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / TEXT_ENCODER_FILE).is_file():
        return path
    found = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    found = [p for p in found if (p / TEXT_ENCODER_FILE).is_file()]
    if not found:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with checkpoints/step_*")
    return found[-1]


def write_sample_grid(
    model: SemanticRoutingDiT,
    ema: EMAModel,
    encoder: TextEncoder,
    features: PromptFeatures,
    dataset: ShapesDataset,
    config: RunConfig,
    path: Path,
    title: str,
) -> None:
    """Sample the display prompts with the EMA weights and save a grid (features reused, no LLM call)."""
    known = set(dataset.captions)  # held-out (benchmark) prompts have no cached features
    scenes = [scene for scene in dataset.task.display_scenes() if caption(scene) in known]
    k = config.sample.images_per_prompt
    prompts = [caption(scene) for scene in scenes for _ in range(k)]
    ids = torch.tensor([dataset.captions.index(p) for p in prompts] + [len(dataset.captions)])
    grid_features = PromptFeatures(features.hidden[ids].float(), features.mask[ids])
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        pipe = SemanticRoutingPipeline.from_parts(model, encoder)
        s = config.sample
        images = pipe.generate(prompts, s.steps, s.guidance_scale, s.shift, seed=0, features=grid_features)
    finally:
        ema.restore(model.parameters())
        model.train()
    save_sample_grid(images, [caption(scene) for scene in scenes], k, path, title=title)


FEATURE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prompt_table(encoder: TextEncoder, captions: list[str], mixed_precision: str, progress: bool) -> PromptFeatures:
    """Features of every training caption plus the null prompt (last row), computed once.

    Stored in the training precision: LayerNorm'd features are O(1), so bf16/fp16 lose nothing that matters.
    """
    return encode_prompts(encoder, captions + [NULL_PROMPT], dtype=FEATURE_DTYPES[mixed_precision], progress=progress)


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ema: EMAModel,
    flow: RectifiedFlow,
    source,
    batch,
    generator: torch.Generator,
    grad_clip: float,
) -> float:
    """One micro-step, the same for every strategy and data source: only what the fusion returns differs.

    Caption dropout, t and noise are drawn for the global batch (every process draws all of them and
    keeps its slice), so N processes train exactly like one process with the same global batch.
    The optimizer, schedule and EMA step once every `gradient_accumulation_steps` micro-steps.
    """
    device = accelerator.device
    n = len(batch[0])
    total, offset = n * accelerator.num_processes, n * accelerator.process_index
    drop = flow.drop_mask(total, generator, device)[offset : offset + n]
    x0, text, mask = source.condition(batch, drop, device)
    t = flow.sample_t(total, device, generator)[offset : offset + n]
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=device)[offset : offset + n]
    with accelerator.accumulate(model):
        loss = flow.loss(lambda x, tt: model(x, tt, text, mask, text_normalized=True), x0, t=t, noise=noise.to(x0.dtype))
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        ema.step(accelerator.unwrap_model(model).parameters())
    return loss.item()


def train(
    config: RunConfig,
    out_dir: Path,
    max_steps: int | None = None,
    minutes: float | None = None,
    progress: bool = True,
    encoder: TextEncoder | None = None,
    features: PromptFeatures | None = None,
) -> TrainResult:
    """Train the configured DiT and write checkpoints under `out_dir/checkpoints`.

    Data: the shapes task, or `config.dataset` (a manifest or saved HF dataset through the VAE and
    LLM, or a precomputed cache that needs neither). Runs under `accelerate launch` as DDP.
    encoder / features: reuse a loaded text encoder and the shapes `prompt_table` of this data config
    across runs (the ablation does) instead of loading and encoding again.
    """
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    from .data.sources import CachedEncoderInfo, ShapesSource, build_source

    t = config.train
    max_steps = max_steps or t.max_steps
    minutes = minutes if minutes is not None else t.minutes
    if t.threads:
        torch.set_num_threads(t.threads)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        # Our loop runs across epochs: an optimizer step is every k micro-batches, not at each epoch end.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    if t.batch_size % accelerator.num_processes:
        raise ValueError(f"train.batch_size {t.batch_size} must divide by the {accelerator.num_processes} processes")
    set_seed(t.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / RUN_CONFIG_FILE)

    def load_encoder():
        return encoder or TextEncoder(config.text_encoder)

    source = build_source(config, load_encoder, features, progress and accelerator.is_main_process)
    # The LLM as the DiT needs to know it; a cache describes it without loading it.
    info = source.encoder if hasattr(source, "encoder") else CachedEncoderInfo(source.dataset.meta["recipe"])

    model = SemanticRoutingDiT(**config.model_kwargs(), text_dim=info.hidden_size, num_text_layers=info.num_layers)
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("DiT %.2fM parameters, strategy %s, %d process(es)", n_params / 1e6, model.fusion.strategy, accelerator.num_processes)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(t.warmup_steps))
    loader = source.loader(t.batch_size, config.dataset.num_workers)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    raw_model = accelerator.unwrap_model(model)
    ema = EMAModel(raw_model.parameters(), decay=t.ema_decay, foreach=True)
    flow = RectifiedFlow(caption_dropout=t.caption_dropout)
    generator = torch.Generator(device=accelerator.device).manual_seed(t.seed + 1)
    vae_path = config.dataset.vae
    if config.dataset.cache is not None and source.dataset.meta["recipe"]["vae"]:
        vae_path = source.dataset.meta["recipe"]["vae"]["path"]

    def checkpoint_to(step: int) -> Path:
        return save_checkpoint(out_dir / "checkpoints" / f"step_{step:06d}", raw_model, ema, optimizer, step, config, info,
                               vae_path=vae_path)

    log_path = out_dir / "log.jsonl"
    # With a time budget the step count is unknown: the bar then counts steps and shows the rate.
    bar = tqdm(
        total=max_steps if minutes is None else None,
        desc=f"train {raw_model.fusion.strategy}" + (f" ({minutes:g} min)" if minutes else ""),
        disable=not progress or not accelerator.is_main_process,
    )
    start = time.perf_counter()
    window_loss, window_images, window_steps, window_start = 0.0, 0, 0, start
    step, last_loss, images_per_s = 0, math.nan, 0.0

    def log_window() -> dict:
        """Average loss and throughput since the last log line; append them to log.jsonl."""
        nonlocal window_loss, window_images, window_steps, window_start, last_loss, images_per_s
        now = time.perf_counter()
        last_loss = window_loss / window_steps
        images_per_s = window_images / (now - window_start)
        record = {
            "step": step,
            "loss": last_loss,
            "images_per_s": images_per_s,
            "lr": scheduler.get_last_lr()[0],
            "fusion_entropy": raw_model.fusion.weight_entropy().item(),
            "elapsed_s": now - start,
        }
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        window_loss, window_images, window_steps, window_start = 0.0, 0, 0, now
        return record

    if not isinstance(source, ShapesSource):
        logger.info("sample grids at checkpoints are drawn for the shapes task only; sample this run with `semroute sample`")
    checkpoint = None
    epoch = 0

    def batches():
        """Micro-batches forever; a new epoch reshuffles (image data) and batches of only broken images are dropped."""
        nonlocal epoch
        while True:
            for batch in loader:
                if batch is not None:
                    yield batch
            epoch += 1
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)

    data = batches()
    model.train()
    while step < max_steps:
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            logger.info("stopping at step %d: the %.1f-minute budget is spent", step, minutes)
            break
        for _ in range(t.gradient_accumulation_steps):
            batch = next(data)
            loss = train_step(accelerator, model, optimizer, scheduler, ema, flow, source, batch, generator, t.grad_clip)
            window_loss += loss / t.gradient_accumulation_steps
            window_images += len(batch[0]) * accelerator.num_processes
        step += 1
        window_steps += 1
        if step % t.log_every == 0 or step == max_steps:
            record = log_window()
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", H=f"{record['fusion_entropy']:.3f}")
        bar.update(1)
        if step % t.checkpoint_every == 0 and accelerator.is_main_process:
            checkpoint = checkpoint_to(step)
            if isinstance(source, ShapesSource):
                write_sample_grid(raw_model, ema, info, source.features, source.dataset, config,
                                  out_dir / "samples" / f"step_{step:06d}.png", title=f"{raw_model.fusion.strategy}, step {step} (EMA)")
    if window_steps:
        log_window()
    bar.close()
    if accelerator.is_main_process and (checkpoint is None or not checkpoint.name.endswith(f"{step:06d}")):
        checkpoint = checkpoint_to(step)
    skipped = getattr(source.dataset, "skips", None)
    result = TrainResult(out_dir / "checkpoints" / f"step_{step:06d}", step, last_loss, images_per_s,
                         skipped_images=len(skipped) if skipped is not None else 0, model=raw_model)
    if accelerator.is_main_process:
        summary = {"steps": step, "final_loss": last_loss, "images_per_s": images_per_s, "epochs_started": epoch + 1,
                   "processes": accelerator.num_processes, "skipped_images": result.skipped_images,
                   "skipped": dict(skipped.skipped) if skipped is not None else {}, "checkpoint": str(result.checkpoint)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if result.skipped_images:
            logger.warning("%d images were skipped (missing or unreadable); listed in %s", result.skipped_images, out_dir / "summary.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
