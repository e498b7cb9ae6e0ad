"""Training: the loop over `step.train_step` for every strategy and data source, built on accelerate.

`train()` sets up (precision, resume), builds the run (`run.build_run`), then steps, logs, checkpoints and
previews until the budget is spent; the run's progress lives in a `TrainState`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .base import TrainingDiverged, TrainingStopped, check_fits_memory, check_threads, gib
from .checkpoint import (
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    TrainingSnapshot,
    prune_checkpoints,
    remove_leftovers,
    save_checkpoint,
)
from .config import RunConfig
from .features import PromptFeatures
from .fileio import entries, read_json, write_json
from .previews import write_sample_grid
from .progress import Pace, log_pace
from .reporting import MetricsWindow, flat_config
from .resume import load_training_state, rng_state
from .run import (
    BatchStream,
    Run,
    TrainResult,
    TrainState,
    accelerator_for,
    build_run,
    resume_point,
    stop_signal,
    stop_signals,
)
from .runtime import cpu_capability, training_precision
from .sharding import is_sharded, plain_copy, snapshot, unsharded
from .speed import configure
from .step import train_step
from .text_encoder import TextEncoder

logger = logging.getLogger(__name__)


@dataclass
class Budget:
    """How long a session trains: `max_steps` in all, and at most `minutes` from `started` if given."""

    max_steps: int
    minutes: float | None
    started: float = field(default_factory=time.perf_counter)

    def time_is_up(self) -> bool:
        return self.minutes is not None and time.perf_counter() - self.started > 60 * self.minutes

    def steps_left(self, step: int, seconds_per_step: float) -> int:
        """Steps after `step` that the budget allows at the measured pace."""
        left = self.max_steps - step
        if self.minutes is not None:
            remaining = 60 * self.minutes - (time.perf_counter() - self.started)
            left = min(left, int(remaining / max(seconds_per_step, 1e-9)))
        return left


@dataclass
class Meters:
    """What a session shows and logs: the progress bar, the ETA and the metrics of the current window."""

    bar: tqdm
    pace: Pace
    window: MetricsWindow


def _save(run: Run, state: TrainState, preview: bool = False) -> None:
    """Save a checkpoint (every process calls: a sharded run gathers its state; the main process writes),
    keep the newest `keep_checkpoints`, and draw the preview grid if asked."""
    main = run.accelerator.is_main_process
    gathered = snapshot(run.raw_model, run.ema, run.optimizer, main)
    path = run.checkpoint_path(state.step)
    if gathered is not None:
        saved = {
            **state.saved(),
            "precision": run.precision.to_dict(),
            "device": str(run.accelerator.device),
            "ema_optimization_step": run.ema.optimization_step,
        }
        save_checkpoint(
            path,
            run.raw_model,
            None,
            None,
            saved,
            run.config,
            run.source.encoder,
            vae_path=run.source.vae_path,
            scheduler=run.scheduler,
            rng=rng_state(run.generator),
            snapshot=gathered,
        )
        prune_checkpoints(run.out_dir, run.config.train.keep_checkpoints)
        if preview:
            _preview(run, state, gathered)
    run.last_checkpoint = path


def _preview(run: Run, state: TrainState, gathered: TrainingSnapshot) -> None:
    preview = run.source.preview()
    if preview is not None and run.config.train.sample_grids:
        sharded = is_sharded(run.raw_model)
        model = plain_copy(run.raw_model, gathered.ema_weights(run.raw_model)) if sharded else run.raw_model
        write_sample_grid(
            model.to(run.accelerator.device),
            None if sharded else run.ema,
            run.source.encoder,
            preview,
            run.config.sample,
            run.precision.name,
            run.out_dir / "samples" / f"step_{state.step:06d}.png",
            title=f"{run.raw_model.fusion.strategy}, step {state.step} (EMA)",
        )


def _count_step(
    run: Run, state: TrainState, losses: list[float], finite: bool | None, images: int, window: MetricsWindow
) -> None:
    """Account for one optimizer step: a finite one enters the
    metrics; too many non-finite ones in a row stop the run."""
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
        "fsdp": is_sharded(run.raw_model),  # sharded over the processes (train.fsdp), or copied to each
        "speed": {**run.speed, "compile": run.compiler.record()},
        "skipped_images": len(skipped),
        "skipped": skipped,
        "checkpoint": str(run.last_checkpoint),
    }


def _optimizer_step(run: Run, micro_batches: list[tuple]) -> list[tuple[float, bool | None]]:
    """`train_step` on each micro-batch of one optimizer step. Should compiled DiT blocks raise, on the
    first compiled step (no working compiler) or any later one (a new shape that inductor compiles
    wrongly), the run goes on eager: the gradients, the accumulation count and the step's random draws are
    put back as they were before the step and the whole step is run again eagerly, so nothing is lost."""
    accelerator = run.accelerator
    counted = accelerator.step  # accelerate's micro-step count (which one syncs)
    drawn = run.generator.get_state()
    try:
        return [train_step(run, batch) for batch in micro_batches]
    except Exception as err:  # inductor's errors have no common base; anything here is the compiler's
        if not run.compiler.used:
            raise
        run.compiler.failed(err)
        # The model's own zero_grad: accelerate's optimizer wrapper skips it mid-accumulation.
        run.model.zero_grad(set_to_none=True)
        accelerator.step = counted
        run.generator.set_state(drawn)
        return [train_step(run, batch) for batch in micro_batches]


def _loop(
    run: Run, state: TrainState, budget: Budget, meters: Meters, batches: BatchStream, received: list[int]
) -> None:
    """Optimizer steps until the budget is spent; log, checkpoint
    and preview on their cadence; stop cleanly on a signal."""
    training, accelerator = run.config.train, run.accelerator
    while state.step < budget.max_steps:
        if budget.time_is_up():
            logger.info("stopping at step %d: the %.1f-minute budget is spent", state.step, budget.minutes)
            break
        run.fusion_frozen = 0 < training.freeze_fusion_after <= state.step
        step_started = time.perf_counter()
        micro_batches = [next(batches) for _ in range(training.gradient_accumulation_steps)]
        results = _optimizer_step(run, micro_batches)
        losses = [loss for loss, _ in results]
        finite = results[-1][1]
        images = sum(len(batch[0]) for batch in micro_batches) * accelerator.num_processes
        seconds = time.perf_counter() - step_started
        steps_left = budget.steps_left(state.step + 1, seconds)
        phase = run.compiler.phase
        run.compiler.observe(seconds, steps_left)
        state.step += 1
        if run.compiler.phase != phase and (
            run.compiler.phase == "first-call" or phase in ("first-call", "compiled")
        ):
            # The kernels changed: the ETA is measured on the steps after the change.
            meters.pace.restart(state.step)
        meters.pace.update(state.step)
        _count_step(run, state, losses, finite, images, meters.window)
        if state.step % training.log_every == 0 or state.step == budget.max_steps:
            record = _log(run, state, meters.window, budget.started)
            meters.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                img_s=f"{record['images_per_s']:.0f}",
                H=f"{record['fusion_entropy']:.3f}",
            )
        meters.bar.update(1)
        if state.step % training.checkpoint_every == 0:
            _save(run, state, preview=True)
        signum = stop_signal(run, received)
        if signum is not None:
            if run.last_checkpoint != run.checkpoint_path(state.step):
                _save(run, state)
            accelerator.wait_for_everyone()
            raise TrainingStopped(signum, state.step, run.last_checkpoint)


RUN_MARKER = ".semroute-run"  # a run directory semroute made (besides its checkpoints and log)
RUN_SIGNS = (RUN_MARKER, "checkpoints", "log.jsonl")  # any one: a semroute run, safe to resume into


# Floats one DiT block keeps per image token for the backward pass, in units of hidden_size: q, k, v, the
# attention output, two norms, the residuals and the MLP's (mlp_ratio x 2) activations; a lower estimate.
ACTIVATION_FLOATS_PER_TOKEN = 10


def activation_bytes(config: RunConfig, processes: int) -> float:
    """A lower estimate of one process's training activations for one micro-batch, in bytes (fp32)."""
    m = config.model.settings()
    tokens = (m["sample_size"] // m["patch_size"]) ** 2
    per_token = (ACTIVATION_FLOATS_PER_TOKEN + 2 * m["mlp_ratio"]) * m["hidden_size"] * 4
    blocks = 1 if config.train.gradient_checkpointing else m["depth"]
    images = -(-config.train.batch_size // max(1, processes))
    text = m["num_text_layers"] * config.text_encoder.max_length * m["text_dim"] * 4  # the LLM layers read
    return images * (blocks * tokens * per_token + text)


def check_batch_memory(config: RunConfig, device: torch.device, processes: int) -> None:
    """Refuse, before the first allocation, a batch whose activations alone would not fit this device."""
    need = activation_bytes(config, processes)
    fix = "lower train.batch_size (raise train.gradient_accumulation_steps for the same batch per update)"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if need > total:
            raise ValueError(
                f"train.batch_size {config.train.batch_size} needs about {gib(need)} of activations, more "
                f"than this GPU's {gib(total)}; {fix}"
            )
    else:
        check_fits_memory(need, f"train.batch_size {config.train.batch_size} (its activations)", fix)


def check_run_directory(out_dir: Path) -> None:
    """Refuse an --out that holds files but is no semroute run: training would overwrite the user's own
    run_config.yaml, summary.json or samples."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory; choose a directory for the run")
    held = entries(out_dir)
    if held and not any((out_dir / sign).exists() for sign in RUN_SIGNS):
        names = ", ".join(sorted(p.name for p in held)[:5]) + (", ..." if len(held) > 5 else "")
        raise ValueError(
            f"--out {out_dir} holds files that are not a semroute run ({names}): training would overwrite "
            "them; choose a new or empty directory"
        )


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
    on_pace: Callable[[float, float], None] | None = None,
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
    training = config.train
    max_steps = max_steps or training.max_steps
    minutes = minutes if minutes is not None else training.minutes
    check_run_directory(out_dir)
    if training.threads:
        torch.set_num_threads(check_threads(training.threads, "train.threads"))
    precision = training_precision(training.mixed_precision, device)
    accelerator = accelerator_for(config, out_dir, device, precision)
    check_batch_memory(config, accelerator.device, accelerator.num_processes)
    set_seed(training.seed)
    resume_from = resume_point(config, out_dir, precision) if resume else None
    speed = configure(accelerator.device)
    if accelerator.is_main_process:
        logger.info("%s on %s", precision.describe(), accelerator.device)
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)
        (out_dir / RUN_MARKER).touch()
        config.save(out_dir / RUN_CONFIG_FILE)
    run = build_run(config, out_dir, accelerator, precision, encoder, features, progress, speed)
    state = TrainState()
    if resume_from is not None:
        saved = load_training_state(
            resume_from, run.raw_model, run.ema, run.optimizer, run.scheduler, run.generator
        )
        state = TrainState(saved["step"], saved["epoch"], saved["position"], saved["nonfinite_steps"])
        run.last_checkpoint = resume_from
        logger.info("resuming from %s (step %d)", resume_from, state.step)
    if run.source.preview() is None and training.sample_grids:
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
    budget = Budget(max_steps, minutes)
    pace = Pace(
        state.step, max_steps, minutes, (on_pace or log_pace) if accelerator.is_main_process else None
    )
    meters = Meters(bar, pace, MetricsWindow())
    window = meters.window
    batches = BatchStream(run, state)
    run.model.train()
    with stop_signals() as received:
        try:
            _loop(run, state, budget, meters, batches, received)
        finally:
            bar.close()  # before any error line, so that the error is the last thing printed
    if window.steps:
        _log(run, state, window, budget.started)
    final = run.checkpoint_path(state.step)
    if run.last_checkpoint != final:
        _save(run, state)
    run.last_checkpoint = final
    summary = _summary(run, state, window)
    finished_before = state.step == pace.first_step and (out_dir / SUMMARY_FILE).is_file()
    if finished_before:  # nothing was trained now: the summary of the session that did stays
        logger.info("%s had already trained %d steps; its summary.json is kept", out_dir, state.step)
        summary = read_json(out_dir / SUMMARY_FILE, "run summary", "delete it to have it written again")
        window.last_loss, window.images_per_s = (
            summary.get("final_loss") or math.nan,
            summary.get("images_per_s") or 0.0,
        )
    elif accelerator.is_main_process:
        write_json(out_dir / SUMMARY_FILE, summary)
        if summary["skipped_images"]:
            logger.warning(
                "%d images were skipped (missing or unreadable); listed in %s",
                summary["skipped_images"],
                out_dir / SUMMARY_FILE,
            )
    model = unsharded(run.raw_model)  # (collective: before the process group ends)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        final, state.step, window.last_loss, window.images_per_s, summary["skipped_images"], model
    )
