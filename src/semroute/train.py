"""Training on the shapes task: one step for every strategy, built on accelerate."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .checkpoint import (  # noqa: F401  (re-exported: the checkpoint API used to live here)
    RUN_CONFIG_FILE,
    TRAINING_STATE_DIR,
    TrainingDiverged,
    load_raw_weights,
    load_training_state,
    newest_loadable,
    prune_checkpoints,
    remove_leftovers,
    resolve_checkpoint,
    resume_differences,
    rng_state,
    save_checkpoint,
)
from .config import RunConfig
from .data.shapes import ShapesDataset, caption
from .dit import SemanticRoutingDiT
from .fileio import write_json
from .flow import RectifiedFlow
from .features import PromptFeatures
from .pipeline import SemanticRoutingPipeline
from .runtime import Precision, configure_device, cpu_capability, resolve_device, resolve_precision
from .plots import save_sample_grid
from .text_encoder import TextEncoder

logger = logging.getLogger(__name__)


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
        pipe = SemanticRoutingPipeline.from_parts(model, encoder, precision=config.train.mixed_precision)
        s = config.sample
        images = pipe.generate(prompts, s.steps, s.guidance_scale, s.shift, seed=0, features=grid_features)
    finally:
        ema.restore(model.parameters())
        model.train()
    save_sample_grid(images, [caption(scene) for scene in scenes], k, path, title=title)


def training_precision(requested: str, device: str) -> Precision:
    """The precision a training run uses; with several processes the main one measures first and the rest reuse its cache."""
    from accelerate import PartialState

    if device not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"training takes --device auto, cpu, cuda or mps, got {device!r}; to pick one GPU of several "
                         f"set CUDA_VISIBLE_DEVICES (accelerate launch gives each process its own GPU)")
    kind = resolve_device(device).type
    with PartialState(cpu=device == "cpu").main_process_first():
        return resolve_precision(requested, kind)


def saved_precision(checkpoint: Path) -> str | None:
    """The precision a checkpoint was trained in (None for checkpoints that predate the record)."""
    try:
        state = json.loads((checkpoint / TRAINING_STATE_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return (state.get("precision") or {}).get("name") if isinstance(state, dict) else None


class Pace:
    """Times a few steps after warm-up, then calls `report(seconds_per_step, seconds_left)` once: an ETA for the user."""

    WARMUP, MEASURED = 2, 10

    def __init__(self, first_step: int, max_steps: int, minutes: float | None, report):
        self.first_step, self.max_steps, self.minutes, self.report = first_step, max_steps, minutes, report
        self.started: float | None = None

    def update(self, step: int) -> None:
        if self.report is None:
            return
        if step == self.first_step + self.WARMUP:
            self.started = time.perf_counter()
        elif self.started is not None and step == self.first_step + self.WARMUP + self.MEASURED:
            per_step = (time.perf_counter() - self.started) / self.MEASURED
            left = (self.max_steps - step) * per_step
            self.report(per_step, left if self.minutes is None else min(left, 60 * self.minutes))
            self.report = None


def log_pace(seconds_per_step: float, seconds_left: float) -> None:
    logger.info("%.2f s per step: about %s of training left", seconds_per_step, format_duration(seconds_left))


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '2 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


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
) -> tuple[float, bool | None]:
    """One micro-step, the same for every strategy and data source: only what the fusion returns differs.

    Caption dropout, t and noise are drawn for the global batch (every process draws all of them and
    keeps its slice), so N processes train exactly like one process with the same global batch.
    The optimizer, schedule and EMA step once every `gradient_accumulation_steps` micro-steps.
    Returns the loss and, on the micro-step that closes an optimizer step, whether the gradient was
    finite (a non-finite one is dropped: no update, no schedule step, no EMA step); None otherwise.
    """
    device = accelerator.device
    n = len(batch[0])
    total, offset = n * accelerator.num_processes, n * accelerator.process_index
    drop = flow.drop_mask(total, generator, device)[offset : offset + n]
    x0, text, mask = source.condition(batch, drop, device)
    t = flow.sample_t(total, device, generator)[offset : offset + n]
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=device)[offset : offset + n]
    finite = None
    with accelerator.accumulate(model):
        loss = flow.loss(lambda x, tt: model(x, tt, text, mask, text_normalized=True), x0, t=t, noise=noise.to(x0.dtype))
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            # The gradient norm is the same on every process (after the all-reduce), so all skip together.
            norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            finite = bool(torch.isfinite(norm))
            if finite:
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    if finite:
        ema.step(accelerator.unwrap_model(model).parameters())
    return loss.item(), finite


def train(
    config: RunConfig,
    out_dir: Path,
    max_steps: int | None = None,
    minutes: float | None = None,
    progress: bool = True,
    encoder: TextEncoder | None = None,
    features: PromptFeatures | None = None,
    resume: bool = True,
    device: str = "auto",
    on_pace=None,
) -> TrainResult:
    """Train the configured DiT and write checkpoints under `out_dir/checkpoints`.

    When `out_dir` already holds a checkpoint the run resumes from the newest loadable one, exactly:
    weights, EMA, optimizer, schedule, step, data position and every RNG (a config that changes
    anything that matters is refused). The step budget counts from 0; a minute budget is per session.

    Data: the shapes task, or `config.dataset` (a manifest or saved HF dataset through the VAE and
    LLM, or a precomputed cache that needs neither). Runs under `accelerate launch` as DDP.
    encoder / features: reuse a loaded text encoder and the shapes `prompt_table` of this data config
    across runs (the ablation does) instead of loading and encoding again.
    device: auto | cpu | cuda | mps (under `accelerate launch` each process takes its own GPU).
    Precision: `config.train.mixed_precision`, resolved for the device (`runtime.resolve_precision`),
    logged once and recorded in summary.json and every checkpoint.
    on_pace(seconds_per_step, seconds_left): called once the step time is measured (default: log the time left).
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    from .data.sources import CachedEncoderInfo, ShapesSource, build_source

    t = config.train
    max_steps = max_steps or t.max_steps
    minutes = minutes if minutes is not None else t.minutes
    if t.threads:
        torch.set_num_threads(t.threads)
    # accelerate keeps one precision per process; a later run in the same process may want another.
    AcceleratorState._reset_state()
    precision = training_precision(t.mixed_precision, device)
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision=precision.accelerate,
        # Our loop runs across epochs: an optimizer step is every k micro-batches, not at each epoch end.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    if t.batch_size % accelerator.num_processes:
        raise ValueError(f"train.batch_size {t.batch_size} must divide by the {accelerator.num_processes} processes")
    set_seed(t.seed)
    resume_from = None
    if resume:
        found = newest_loadable(out_dir, config)
        if found is not None:
            resume_from, saved = found
            differences = resume_differences(saved, config)
            if differences:
                raise ValueError(
                    f"{out_dir} holds a run ({resume_from.name}) made with another config; resuming would change "
                    f"{'; '.join(differences)}. Restore those settings to resume, or train into a new --out"
                )
            if saved_precision(resume_from) not in (None, precision.name):
                logger.warning("%s was trained in %s; this session runs in %s, so the resumed run will not be bitwise "
                               "what an uninterrupted run gives", resume_from.name, saved_precision(resume_from), precision.name)
    configure_device(accelerator.device)
    if accelerator.is_main_process:
        logger.info("%s on %s", precision.describe(), accelerator.device)
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)
        config.save(out_dir / RUN_CONFIG_FILE)

    def load_encoder():
        return encoder or TextEncoder(config.text_encoder, device=accelerator.device)

    source = build_source(config, load_encoder, features, progress and accelerator.is_main_process, precision.dtype,
                          accelerator.device)
    # The LLM as the DiT needs to know it; a cache describes it without loading it.
    info = source.encoder if hasattr(source, "encoder") else CachedEncoderInfo(source.dataset.meta["recipe"])

    model = SemanticRoutingDiT(**config.model.dit_kwargs(), text_dim=info.hidden_size, num_text_layers=info.num_layers)
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

    step, epoch, position, nonfinite_steps, bad_streak = 0, 0, 0, 0, 0
    if resume_from is not None:
        state = load_training_state(resume_from, raw_model, ema, optimizer, scheduler, generator)
        step, epoch, position, nonfinite_steps = state["step"], state["epoch"], state["position"], state["nonfinite_steps"]
        logger.info("resuming from %s (step %d)", resume_from, step)

    def checkpoint_to(step: int) -> Path:
        """Save, then keep the newest `keep_checkpoints` (the one just written is the newest)."""
        state = {"step": step, "epoch": epoch, "position": position, "nonfinite_steps": nonfinite_steps,
                 "precision": precision.to_dict(), "device": str(accelerator.device)}
        path = save_checkpoint(out_dir / "checkpoints" / f"step_{step:06d}", raw_model, ema, optimizer, state, config, info,
                               vae_path=vae_path, scheduler=scheduler, rng=rng_state(generator))
        prune_checkpoints(out_dir, t.keep_checkpoints)
        return path

    log_path = out_dir / "log.jsonl"
    # With a time budget the step count is unknown: the bar then counts steps and shows the rate.
    bar = tqdm(
        total=max_steps if minutes is None else None,
        desc=f"train {raw_model.fusion.strategy}" + (f" ({minutes:g} min)" if minutes else ""),
        disable=not progress or not accelerator.is_main_process,
    )
    start = time.perf_counter()
    window_loss, window_images, window_steps, window_start = 0.0, 0, 0, start
    last_loss, images_per_s = math.nan, 0.0
    bar.update(step)

    def log_window() -> dict:
        """Average loss and throughput since the last log line; append them to log.jsonl."""
        nonlocal window_loss, window_images, window_steps, window_start, last_loss, images_per_s
        now = time.perf_counter()
        last_loss = window_loss / window_steps if window_steps else math.nan
        images_per_s = window_images / (now - window_start)
        record = {
            "step": step,
            "loss": last_loss,
            "images_per_s": images_per_s,
            "lr": scheduler.get_last_lr()[0],
            "fusion_entropy": raw_model.fusion.weight_entropy().item(),
            "nonfinite_steps": nonfinite_steps,
            "elapsed_s": now - start,
        }
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        window_loss, window_images, window_steps, window_start = 0.0, 0, 0, now
        return record

    if not isinstance(source, ShapesSource):
        logger.info("sample grids at checkpoints are drawn for the shapes task only; sample this run with `semroute sample`")
    checkpoint = resume_from

    def batches():
        """Micro-batches forever from (epoch, position); a new epoch reshuffles (image data).

        `position` counts the micro-batches consumed in this epoch, those dropped for holding only
        broken images included, so a resumed run skips exactly what the first run consumed.
        """
        nonlocal epoch, position
        while True:
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
            for batch in accelerator.skip_first_batches(loader, position) if position else loader:
                position += 1
                if batch is not None:
                    yield batch
            epoch, position = epoch + 1, 0

    data = batches()
    model.train()
    pace = Pace(step, max_steps, minutes, (on_pace or log_pace) if accelerator.is_main_process else None)
    while step < max_steps:
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            logger.info("stopping at step %d: the %.1f-minute budget is spent", step, minutes)
            break
        images, losses = 0, []
        for _ in range(t.gradient_accumulation_steps):
            batch = next(data)
            loss, finite = train_step(accelerator, model, optimizer, scheduler, ema, flow, source, batch, generator, t.grad_clip)
            losses.append(loss)
            images += len(batch[0]) * accelerator.num_processes
        step += 1
        pace.update(step)
        if finite:
            bad_streak = 0
            window_loss += sum(losses) / len(losses)
            window_images += images
            window_steps += 1
        else:
            bad_streak += 1
            nonfinite_steps += 1
            logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)", step, bad_streak, nonfinite_steps)
            if bad_streak >= t.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"{bad_streak} consecutive steps had a non-finite loss or gradient (through step {step}); the last good "
                    f"checkpoint is {checkpoint or 'none (nothing was saved yet)'}. Lower train.lr, raise "
                    f"train.warmup_steps or check the data, then resume"
                )
        if step % t.log_every == 0 or step == max_steps:
            record = log_window()
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", H=f"{record['fusion_entropy']:.3f}")
        bar.update(1)
        if step % t.checkpoint_every == 0 and accelerator.is_main_process:
            checkpoint = checkpoint_to(step)
            if isinstance(source, ShapesSource) and t.sample_grids:
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
                   "nonfinite_steps": nonfinite_steps, "precision": precision.to_dict(), "device": str(accelerator.device),
                   "cpu_capability": cpu_capability(),
                   "processes": accelerator.num_processes, "skipped_images": result.skipped_images,
                   "skipped": dict(skipped.skipped) if skipped is not None else {}, "checkpoint": str(result.checkpoint)}
        write_json(out_dir / "summary.json", summary)
        if result.skipped_images:
            logger.warning("%d images were skipped (missing or unreadable); listed in %s", result.skipped_images, out_dir / "summary.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
