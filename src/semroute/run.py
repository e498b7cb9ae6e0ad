"""A training run's parts and bookkeeping: its accelerator, the checkpoint it resumes from, the model and
data it builds, the data stream that resumes mid-epoch, and stopping on a signal."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    convert_outputs_to_fp32,
)
from diffusers.training_utils import EMAModel

from .checkpoint import checkpoint_dir
from .config import RunConfig
from .dit import SemanticRoutingDiT
from .features import PromptFeatures, dit_text_args
from .flow import RectifiedFlow
from .fusion import STRATEGY_TABLE
from .reporting import check_tracker
from .resume import newest_loadable, resume_differences, saved_precision
from .runtime import Precision, resolve_device
from .sharding import is_sharded, shard_model
from .sources import build_source
from .speed import StepCompiler
from .step import StepParts, build_optimizer, warmup_schedule
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


@dataclass(kw_only=True)
class Run(StepParts):
    """What the helpers of one training run share: the step's parts and the run's own."""

    config: RunConfig
    out_dir: Path
    precision: Precision
    loader: torch.utils.data.DataLoader
    compiler: StepCompiler
    speed: dict  # the speed choices of this process (`speed.configure`), for the summary
    last_checkpoint: Path | None = None

    @property
    def raw_model(self) -> SemanticRoutingDiT:
        return self.accelerator.unwrap_model(self.model)

    def checkpoint_path(self, step: int) -> Path:
        return checkpoint_dir(self.out_dir, step)


class BatchStream:
    """Micro-batches forever from the state's (epoch, position); a new epoch reorders the data.

    It advances `state.position` for every batch the loader yields, including those dropped for
    holding only broken images, so a resumed run skips exactly what the first run consumed.
    """

    def __init__(self, run: Run, state: TrainState):
        self.run, self.state = run, state
        self.batches = self._batches()

    def _batches(self) -> Iterator[tuple]:
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

    def __next__(self) -> tuple:
        return next(self.batches)


def accelerator_for(config: RunConfig, out_dir: Path, device: str, precision: Precision) -> Accelerator:
    """This process's accelerator: its device, precision, gradient accumulation and trackers."""
    training = config.train
    check_tracker(training.report_to)
    # accelerate keeps one precision per process; a later run in the same process may want another.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=resolve_device(device).type == "cpu",  # see runtime.process_state
        mixed_precision=precision.accelerate,
        # Our loop runs across epochs: an optimizer step is every k micro-batches, not at each epoch end.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=training.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=None if training.report_to == "none" else training.report_to,
        project_dir=out_dir,
    )
    if training.batch_size % accelerator.num_processes:
        raise ValueError(
            f"train.batch_size {training.batch_size} must divide by the {accelerator.num_processes} processes"
        )
    return accelerator


def resume_point(config: RunConfig, out_dir: Path, precision: Precision) -> Path | None:
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


def build_run(
    config: RunConfig,
    out_dir: Path,
    accelerator: Accelerator,
    precision: Precision,
    encoder: TextEncoder | None,
    features: PromptFeatures | None,
    progress: bool,
    speed: dict,
) -> Run:
    """Data source, DiT, optimizer, schedule, EMA and compile controller of a run, prepared by accelerate."""
    training = config.train
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
    if training.freeze_fusion_after and not any(True for _ in model.fusion.parameters()):
        learned = [
            name
            for name, spec in STRATEGY_TABLE.items()
            if spec.logits in ("vector", "time_mlp", "attention")
        ]
        raise ValueError(
            f"train.freeze_fusion_after freezes learned fusion weights, and strategy "
            f"{model.fusion.strategy!r} has none; use it with {', '.join(learned)}, or set it to 0"
        )
    if training.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "DiT %.2fM parameters, strategy %s, %d process(es)",
        n_params / 1e6,
        model.fusion.strategy,
        accelerator.num_processes,
    )
    loader = source.loader(training.batch_size, config.dataset.num_workers)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "semroute shards the DiT itself: set train.fsdp: true and launch without accelerate's --use_fsdp "
            "(its FSDP plugin would wrap the model, and checkpoints would not gather it)"
        )
    if training.fsdp and accelerator.num_processes > 1:
        shard(model, accelerator)  # before the optimizer is built: it must hold the sharded parameters
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(training.warmup_steps))
    if is_sharded(model):  # accelerate runs the processes and splits the batches; the model is ours
        optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=training.ema_decay, foreach=True)

    def agree(flag: bool) -> bool:  # every process compiles, or none
        if accelerator.num_processes == 1:
            return flag
        return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), reduction="min"))

    mode = str(training.compile)  # TrainConfig has read YAML booleans as on/off
    compiler = StepCompiler(accelerator.unwrap_model(model), mode, accelerator.device, agree)
    return Run(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        flow=RectifiedFlow(caption_dropout=training.caption_dropout),
        source=source,
        generator=torch.Generator(device=accelerator.device).manual_seed(training.seed + 1),
        grad_clip=training.grad_clip,
        noise_level_weight=training.noise_level_weight,
        config=config,
        out_dir=out_dir,
        precision=precision,
        loader=loader,
        compiler=compiler,
        speed=speed,
    )


def shard(model: SemanticRoutingDiT, accelerator: Accelerator) -> None:
    """`train.fsdp`: shard the DiT over the processes (`sharding.shard_model`), with the precision accelerate
    would give a model it prepared (autocast, fp32 outputs)."""
    model.to(accelerator.device)
    shard_model(model)
    if accelerator.native_amp:
        model.forward = convert_outputs_to_fp32(accelerator.autocast()(model.forward))  # type: ignore[method-assign]


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """SIGTERM (what schedulers send before a kill) and SIGINT ask the loop to stop at the next step boundary.

    Yields the list of signals received; a second SIGINT interrupts at once.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_signal(run: Run, received: list[int]) -> int | None:
    """The signal every process stops for, or None (under
    several processes they agree through an all-reduce)."""
    signum = received[0] if received else 0
    if run.accelerator.num_processes > 1:
        signum = int(
            run.accelerator.reduce(torch.tensor(signum, device=run.accelerator.device), reduction="max")
        )
    return signum or None
