"""One training step, the same for every strategy and data source: the optimizer, its schedule, and the
micro-step that draws caption dropout, t and noise, takes the flow loss and updates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from .config import RunConfig
from .dit import SemanticRoutingDiT
from .features import drop_captions
from .flow import RectifiedFlow
from .sources import BatchSource


@dataclass
class StepParts:
    """What one training step reads and updates."""

    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel
    flow: RectifiedFlow
    source: BatchSource
    generator: torch.Generator
    grad_clip: float
    noise_level_weight: float = 1.0
    # The fusion's learned weights stay as they are (train.freeze_fusion_after, GRAN-TED): their gradients are
    # dropped before the update, so AdamW leaves them (and their moments) alone.
    fusion_frozen: bool = False


def build_optimizer(model: SemanticRoutingDiT, config: RunConfig) -> torch.optim.AdamW:
    """AdamW with the fusion gates in their own groups, scaled
    so that logits move at about `fusion_lr` per step."""
    training = config.train
    fusion_ids = {id(p) for p in model.fusion.parameters()}
    rest = [p for p in model.parameters() if id(p) not in fusion_ids]
    groups = [{"params": rest, "lr": training.lr}, *model.fusion.optimizer_groups(training.fusion_lr)]
    beta1, beta2 = training.betas
    return torch.optim.AdamW(groups, betas=(beta1, beta2), weight_decay=training.weight_decay)


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup to the base LR, then constant (the paper's constant LR)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def train_step(parts: StepParts, batch: tuple) -> tuple[float, bool | None]:
    """One micro-step, the same for every strategy and data source: only what the fusion returns differs.

    Caption dropout, t and noise are drawn for the global batch (every process draws all of them and
    keeps its slice), so N processes train exactly like one process with the same global batch.
    The optimizer, schedule and EMA step once every `gradient_accumulation_steps` micro-steps.
    Returns the loss and, on the micro-step that closes an optimizer step, whether the gradient was
    finite (a non-finite one is dropped: no update, no schedule step, no EMA step); None otherwise.
    A DiT with a noise-level head (gate_signal: estimated) also fits it to t: noise_level_weight x
    MSE(estimate, t) is added to the gradient, not to the returned (flow) loss.
    """
    accelerator, model, flow, generator = parts.accelerator, parts.model, parts.flow, parts.generator
    device = accelerator.device
    n = len(batch[0])
    total, offset = n * accelerator.num_processes, n * accelerator.process_index
    drop = flow.drop_mask(total, generator, device)[offset : offset + n]
    x0, text, mask = parts.source.condition(batch, device)
    text, mask = drop_captions(text, mask, *parts.source.null, drop)
    t = flow.sample_t(total, device, generator)[offset : offset + n]
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=device)[offset : offset + n]
    finite = None
    estimates = accelerator.unwrap_model(model).noise_head is not None
    levels = []

    def velocity(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        if not estimates:
            return model(x, tt, text, mask, text_normalized=True)
        v, level = model(x, tt, text, mask, text_normalized=True, return_noise_level=True)
        levels.append(torch.nn.functional.mse_loss(level.float(), tt.float()))
        return v

    with accelerator.accumulate(model):
        loss = flow.loss(velocity, x0, t=t, noise=noise.to(x0.dtype))
        accelerator.backward(loss + parts.noise_level_weight * levels[0] if levels else loss)
        if accelerator.sync_gradients:
            if parts.fusion_frozen:
                for p in accelerator.unwrap_model(model).fusion.parameters():
                    p.grad = None
            # The gradient norm is the same on every process (after the all-reduce), so all skip together.
            norm = accelerator.clip_grad_norm_(model.parameters(), parts.grad_clip)
            finite = bool(torch.isfinite(norm))
            if finite:
                parts.optimizer.step()
                parts.scheduler.step()
            parts.optimizer.zero_grad(set_to_none=True)
    if finite:
        parts.ema.step(accelerator.unwrap_model(model).parameters())
    return loss.item(), finite
