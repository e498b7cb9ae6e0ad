"""Training: one step for every strategy and data source, built on accelerate.

`train()` is a short loop over small helpers: set up (precision, resume), build the run, then step,
log, checkpoint and preview until the budget is spent; the run's state lives in a `TrainState`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .base import TrainingDiverged, TrainingStopped
from .checkpoint import (
    RUN_CONFIG_FILE,
    load_training_state,
    newest_loadable,
    prune_checkpoints,
    remove_leftovers,
    resume_differences,
    rng_state,
    save_checkpoint,
    saved_precision,
)
from .config import RunConfig
from .data.sources import BatchSource, build_source
from .dit import SemanticRoutingDiT
from .features import PromptFeatures, dit_text_args, drop_captions
from .fileio import read_json, write_json
from .flow import RectifiedFlow
from .progress import Pace, log_pace
from .reporting import MetricsWindow, check_tracker, flat_config
from .runtime import Precision, cpu_capability, resolve_device, training_precision
from .speed import StepCompiler, configure
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


@dataclass
class TrainState:
    """Where a run is; all but `bad_streak` is saved with every checkpoint and restored on resume."""

    step: int = 0
    epoch: int = 0
    # Micro-batches consumed in this epoch, those dropped for holding only broken images included.
    position: int = 0
    nonfinite_steps: int = 0
    bad_streak: int = 0

    def saved(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "bad_streak"}


@dataclass
class Run:
    """What the helpers of one training run share."""

    config: RunConfig
    out_dir: Path
    accelerator: Accelerator
    precision: Precision
    source: BatchSource
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader
    ema: EMAModel
    flow: RectifiedFlow
    generator: torch.Generator
    compiler: StepCompiler
    speed: dict  # the speed choices of this process (`speed.configure`), for the summary
    last_checkpoint: Path | None = None

    @property
    def raw_model(self) -> SemanticRoutingDiT:
        return self.accelerator.unwrap_model(self.model)


def build_optimizer(model: SemanticRoutingDiT, config: RunConfig) -> torch.optim.AdamW:
    """AdamW with the fusion gates in their own groups, scaled so that logits move at about `fusion_lr` per
    step."""
    t = config.train
    fusion_ids = {id(p) for p in model.fusion.parameters()}
    rest = [p for p in model.parameters() if id(p) not in fusion_ids]
    groups = [{"params": rest, "lr": t.lr}, *model.fusion.optimizer_groups(t.fusion_lr)]
    return torch.optim.AdamW(groups, betas=tuple(t.betas), weight_decay=t.weight_decay)


def warmup_schedule(warmup_steps: int):
    """Linear warmup to the base LR, then constant (the paper's constant LR)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ema: EMAModel,
    flow: RectifiedFlow,
    source: BatchSource,
    batch,
    generator: torch.Generator,
    grad_clip: float,
    noise_level_weight: float = 1.0,
) -> tuple[float, bool | None]:
    """One micro-step, the same for every strategy and data source: only what the fusion returns differs.

    Caption dropout, t and noise are drawn for the global batch (every process draws all of them and
    keeps its slice), so N processes train exactly like one process with the same global batch.
    The optimizer, schedule and EMA step once every `gradient_accumulation_steps` micro-steps.
    Returns the loss and, on the micro-step that closes an optimizer step, whether the gradient was
    finite (a non-finite one is dropped: no update, no schedule step, no EMA step); None otherwise.
    A DiT with a noise-level head (gate_signal: estimated) also fits it to t: noise_level_weight x
    MSE(estimate, t) is added to the gradient, not to the returned (flow) loss.
    """
    device = accelerator.device
    n = len(batch[0])
    total, offset = n * accelerator.num_processes, n * accelerator.process_index
    drop = flow.drop_mask(total, generator, device)[offset : offset + n]
    x0, text, mask = source.condition(batch, device)
    text, mask = drop_captions(text, mask, *source.null, drop)
    t = flow.sample_t(total, device, generator)[offset : offset + n]
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=device)[offset : offset + n]
    finite = None
    estimates = accelerator.unwrap_model(model).noise_head is not None
    levels = []

    def velocity(x, tt):
        if not estimates:
            return model(x, tt, text, mask, text_normalized=True)
        v, level = model(x, tt, text, mask, text_normalized=True, return_noise_level=True)
        levels.append(torch.nn.functional.mse_loss(level.float(), tt.float()))
        return v

    with accelerator.accumulate(model):
        loss = flow.loss(velocity, x0, t=t, noise=noise.to(x0.dtype))
        accelerator.backward(loss + noise_level_weight * levels[0] if levels else loss)
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


class BatchStream:
    """Micro-batches forever from the state's (epoch, position); a new epoch reorders the data.

    It advances `state.position` for every batch the loader yields, including those dropped for
    holding only broken images, so a resumed run skips exactly what the first run consumed.
    """

    def __init__(self, run: Run, state: TrainState):
        self.run, self.state = run, state
        self.batches = self._batches()

    def _batches(self):
        loader, state = self.run.loader, self.state
        while True:
            self.run.source.set_epoch(state.epoch)
            usable, whole_epoch = 0, state.position == 0
            for batch in (
                self.run.accelerator.skip_first_batches(loader, state.position) if state.position else loader
            ):
                state.position += 1
                if batch is not None:
                    usable += 1
                    yield batch
            if usable == 0 and whole_epoch:  # a whole epoch of broken images would otherwise loop for ever
                skipped = self.run.source.skipped()
                example = next(iter(skipped.items()), ("-", "-"))
                raise ValueError(
                    f"epoch {state.epoch} held no usable image ({len(skipped)} skipped, e.g. {example[0]}: "
                    f"{example[1]}); fix or replace the images"
                )
            state.epoch, state.position = state.epoch + 1, 0

    def __next__(self):
        return next(self.batches)


def _accelerator(config: RunConfig, out_dir: Path, device: str, precision: Precision) -> Accelerator:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    t = config.train
    check_tracker(t.report_to)
    # accelerate keeps one precision per process; a later run in the same process may want another.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=resolve_device(device).type == "cpu",  # see runtime.process_state
        mixed_precision=precision.accelerate,
        # Our loop runs across epochs: an optimizer step is every k micro-batches, not at each epoch end.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=None if t.report_to == "none" else t.report_to,
        project_dir=out_dir,
    )
    if t.batch_size % accelerator.num_processes:
        raise ValueError(
            f"train.batch_size {t.batch_size} must divide by the {accelerator.num_processes} processes"
        )
    return accelerator


def _resume_point(config: RunConfig, out_dir: Path, precision: Precision) -> Path | None:
    """The checkpoint to resume from (refused when its config differs in what matters), or None."""
    found = newest_loadable(out_dir, config)
    if found is None:
        return None
    checkpoint, saved = found
    differences = resume_differences(saved, config)
    if differences:
        raise ValueError(
            f"{out_dir} holds a run ({checkpoint.name}) made with another config; resuming would change "
            f"{'; '.join(differences)}. Restore those settings to resume, or train into a new --out"
        )
    if saved_precision(checkpoint) not in (None, precision.name):
        logger.warning(
            "%s was trained in %s; this session runs in %s, so the resumed run will not be bitwise "
            "what an uninterrupted run gives",
            checkpoint.name,
            saved_precision(checkpoint),
            precision.name,
        )
    return checkpoint


def _build_run(config, out_dir, accelerator, precision, encoder, features, progress, speed: dict) -> Run:
    t = config.train
    source = build_source(
        config,
        lambda: encoder or TextEncoder(config.text_encoder, device=accelerator.device),
        features,
        progress and accelerator.is_main_process,
        precision.dtype,
        accelerator.device,
    )
    info = source.encoder
    model = SemanticRoutingDiT(**config.model.dit_kwargs(), **dit_text_args(info))
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "DiT %.2fM parameters, strategy %s, %d process(es)",
        n_params / 1e6,
        model.fusion.strategy,
        accelerator.num_processes,
    )
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(t.warmup_steps))
    loader = source.loader(t.batch_size, config.dataset.num_workers)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=t.ema_decay, foreach=True)

    def agree(flag: bool) -> bool:  # every process compiles, or none
        if accelerator.num_processes == 1:
            return flag
        return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), reduction="min"))

    compiler = StepCompiler(accelerator.unwrap_model(model), t.compile, accelerator.device, agree)
    return Run(
        config,
        out_dir,
        accelerator,
        precision,
        source,
        model,
        optimizer,
        scheduler,
        loader,
        ema,
        RectifiedFlow(caption_dropout=t.caption_dropout),
        torch.Generator(device=accelerator.device).manual_seed(t.seed + 1),
        compiler,
        speed,
    )


def _save(run: Run, state: TrainState) -> Path:
    """Save a checkpoint, then keep the newest `keep_checkpoints` (the one just written is the newest)."""
    saved = {**state.saved(), "precision": run.precision.to_dict(), "device": str(run.accelerator.device)}
    path = save_checkpoint(
        run.out_dir / "checkpoints" / f"step_{state.step:06d}",
        run.raw_model,
        run.ema,
        run.optimizer,
        saved,
        run.config,
        run.source.encoder,
        vae_path=run.source.vae_path,
        scheduler=run.scheduler,
        rng=rng_state(run.generator),
    )
    prune_checkpoints(run.out_dir, run.config.train.keep_checkpoints)
    run.last_checkpoint = path
    return path


def _preview(run: Run, state: TrainState) -> None:
    from .previews import write_sample_grid

    preview = run.source.preview()
    if preview is not None and run.config.train.sample_grids:
        write_sample_grid(
            run.raw_model,
            run.ema,
            run.source.encoder,
            preview,
            run.config.sample,
            run.precision.name,
            run.out_dir / "samples" / f"step_{state.step:06d}.png",
            title=f"{run.raw_model.fusion.strategy}, step {state.step} (EMA)",
        )


def _count_step(
    run: Run, state: TrainState, losses: list[float], finite: bool, images: int, window: MetricsWindow
) -> None:
    """Account for one optimizer step: a finite one enters the metrics; too many non-finite ones in a row stop
    the run."""
    if finite:
        state.bad_streak = 0
        window.add(sum(losses) / len(losses), images)
        return
    state.bad_streak += 1
    state.nonfinite_steps += 1
    logger.warning(
        "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
        state.step,
        state.bad_streak,
        state.nonfinite_steps,
    )
    if state.bad_streak >= run.config.train.max_nonfinite_steps:
        raise TrainingDiverged(
            f"{state.bad_streak} consecutive steps had a non-finite loss or gradient (through step "
            f"{state.step}); the last good checkpoint is "
            f"{run.last_checkpoint or 'none (nothing was saved yet)'}. Lower train.lr, raise "
            "train.warmup_steps or check the data, then resume"
        )


def _log(run: Run, state: TrainState, window: MetricsWindow, started: float) -> dict:
    extra = {
        "lr": run.scheduler.get_last_lr()[0],
        "fusion_entropy": run.raw_model.fusion.weight_entropy().item(),
        "nonfinite_steps": state.nonfinite_steps,
    }
    return window.flush(run.accelerator, run.out_dir / "log.jsonl", state.step, extra, started)


@contextmanager
def stop_signals():
    """SIGTERM (what schedulers send before a kill) and SIGINT ask the loop to stop at the next step boundary.

    Yields the list of signals received; a second SIGINT interrupts at once.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stop_signal(run: Run, received: list[int]) -> int | None:
    """The signal every process stops for, or None (under several processes they agree through an
    all-reduce)."""
    signum = received[0] if received else 0
    if run.accelerator.num_processes > 1:
        signum = int(
            run.accelerator.reduce(torch.tensor(signum, device=run.accelerator.device), reduction="max")
        )
    return signum or None


def _summary(run: Run, state: TrainState, window: MetricsWindow) -> dict:
    skipped = run.source.skipped()
    return {
        "steps": state.step,
        "final_loss": window.last_loss,
        "images_per_s": window.images_per_s,
        "epochs_started": state.epoch + 1,
        "nonfinite_steps": state.nonfinite_steps,
        "precision": run.precision.to_dict(),
        "device": str(run.accelerator.device),
        "cpu_capability": cpu_capability(),
        "processes": run.accelerator.num_processes,
        "speed": {**run.speed, "compile": run.compiler.record()},
        "skipped_images": len(skipped),
        "skipped": skipped,
        "checkpoint": str(run.last_checkpoint),
    }


def _micro_step(run: Run, batch) -> tuple[float, bool | None]:
    """`train_step` on `batch`; should the first compiled step fail (no working compiler), the run goes on
    eager."""
    t = run.config.train

    def step():
        return train_step(
            run.accelerator,
            run.model,
            run.optimizer,
            run.scheduler,
            run.ema,
            run.flow,
            run.source,
            batch,
            run.generator,
            t.grad_clip,
            t.noise_level_weight,
        )

    if not run.compiler.compiling:
        return step()
    try:
        return step()
    except Exception as err:  # inductor's errors have no common base; anything here is the compiler's
        run.compiler.failed(err)
        run.optimizer.zero_grad(set_to_none=True)
        return step()


def _loop(
    run: Run,
    state: TrainState,
    batches: BatchStream,
    window: MetricsWindow,
    bar,
    pace: Pace,
    started: float,
    max_steps: int,
    minutes: float | None,
    received: list[int],
) -> None:
    """Optimizer steps until the budget is spent; log, checkpoint and preview on their cadence; stop cleanly
    on a signal."""
    t, accelerator = run.config.train, run.accelerator
    while state.step < max_steps:
        if minutes is not None and time.perf_counter() - started > 60 * minutes:
            logger.info("stopping at step %d: the %.1f-minute budget is spent", state.step, minutes)
            break
        losses, images = [], 0
        step_started = time.perf_counter()
        for _ in range(t.gradient_accumulation_steps):
            batch = next(batches)
            loss, finite = _micro_step(run, batch)
            losses.append(loss)
            images += len(batch[0]) * accelerator.num_processes
        seconds = time.perf_counter() - step_started
        steps_left = max_steps - state.step - 1
        if minutes is not None:
            steps_left = min(
                steps_left, int((60 * minutes - (time.perf_counter() - started)) / max(seconds, 1e-9))
            )
        phase = run.compiler.phase
        run.compiler.observe(seconds, steps_left)
        state.step += 1
        if run.compiler.phase != phase and (
            run.compiler.phase == "first-call" or phase in ("first-call", "compiled")
        ):
            pace.restart(state.step)  # the kernels changed: the ETA is measured on the steps after the change
        pace.update(state.step)
        _count_step(run, state, losses, finite, images, window)
        if state.step % t.log_every == 0 or state.step == max_steps:
            record = _log(run, state, window, started)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                img_s=f"{record['images_per_s']:.0f}",
                H=f"{record['fusion_entropy']:.3f}",
            )
        bar.update(1)
        if state.step % t.checkpoint_every == 0 and accelerator.is_main_process:
            _save(run, state)
            _preview(run, state)
        signum = _stop_signal(run, received)
        if signum is not None:
            if (
                accelerator.is_main_process
                and run.last_checkpoint != run.out_dir / "checkpoints" / f"step_{state.step:06d}"
            ):
                _save(run, state)
            accelerator.wait_for_everyone()
            raise TrainingStopped(signum, state.step, run.last_checkpoint)


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

    Data: any `BatchSource` (the shapes task, `config.dataset` through the VAE and LLM, or a
    precomputed cache). Runs under `accelerate launch` as DDP.
    encoder / features: reuse a loaded text encoder and the shapes `prompt_table` of this data config
    across runs (the ablation does) instead of loading and encoding again.
    device: auto | cpu | cuda | mps (under `accelerate launch` each process takes its own GPU).
    Precision: `config.train.mixed_precision`, resolved for the device (`runtime.resolve_precision`),
    logged once and recorded in summary.json and every checkpoint.
    on_pace(seconds_per_step, seconds_left): called once the step time is measured (default: log the time
    left).
    """
    t = config.train
    max_steps = max_steps or t.max_steps
    minutes = minutes if minutes is not None else t.minutes
    if t.threads:
        torch.set_num_threads(t.threads)
    precision = training_precision(t.mixed_precision, device)
    accelerator = _accelerator(config, out_dir, device, precision)
    set_seed(t.seed)
    resume_from = _resume_point(config, out_dir, precision) if resume else None
    speed = configure(accelerator.device)
    if accelerator.is_main_process:
        logger.info("%s on %s", precision.describe(), accelerator.device)
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)
        config.save(out_dir / RUN_CONFIG_FILE)
    run = _build_run(config, out_dir, accelerator, precision, encoder, features, progress, speed)
    state = TrainState()
    if resume_from is not None:
        saved = load_training_state(
            resume_from, run.raw_model, run.ema, run.optimizer, run.scheduler, run.generator
        )
        state = TrainState(saved["step"], saved["epoch"], saved["position"], saved["nonfinite_steps"])
        run.last_checkpoint = resume_from
        logger.info("resuming from %s (step %d)", resume_from, state.step)
    if run.source.preview() is None and t.sample_grids:
        logger.info(
            "this data source has no preview prompts: no sample grids at checkpoints; sample the run with "
            "`semroute sample`"
        )
    accelerator.init_trackers(out_dir.name, config=flat_config(config.to_dict()))

    # With a time budget the step count is unknown: the bar then counts steps and shows the rate.
    bar = tqdm(
        total=max_steps if minutes is None else None,
        initial=state.step,
        desc=f"train {run.raw_model.fusion.strategy}" + (f" ({minutes:g} min)" if minutes else ""),
        disable=not progress or not accelerator.is_main_process,
    )
    started, window = time.perf_counter(), MetricsWindow()
    pace = Pace(
        state.step, max_steps, minutes, (on_pace or log_pace) if accelerator.is_main_process else None
    )
    batches = BatchStream(run, state)
    run.model.train()
    with stop_signals() as received:
        try:
            _loop(run, state, batches, window, bar, pace, started, max_steps, minutes, received)
        finally:
            bar.close()  # before any error line, so that the error is the last thing printed
    if window.steps:
        _log(run, state, window, started)
    final = run.out_dir / "checkpoints" / f"step_{state.step:06d}"
    if accelerator.is_main_process and run.last_checkpoint != final:
        _save(run, state)
    run.last_checkpoint = final
    summary = _summary(run, state, window)
    finished_before = state.step == pace.first_step and (out_dir / "summary.json").is_file()
    if finished_before:  # nothing was trained now: the summary of the session that did stays
        logger.info("%s had already trained %d steps; its summary.json is kept", out_dir, state.step)
        summary = read_json(out_dir / "summary.json", "run summary", "delete it to have it written again")
        window.last_loss, window.images_per_s = (
            summary.get("final_loss") or math.nan,
            summary.get("images_per_s") or 0.0,
        )
    elif accelerator.is_main_process:
        write_json(out_dir / "summary.json", summary)
        if summary["skipped_images"]:
            logger.warning(
                "%d images were skipped (missing or unreadable); listed in %s",
                summary["skipped_images"],
                out_dir / "summary.json",
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        final, state.step, window.last_loss, window.images_per_s, summary["skipped_images"], run.raw_model
    )
