"""Rectified flow: the training loss and the guided sampler, and the sampling settings. The trainer calls only
these.

Convention (t in [0, 1], 1 = pure noise):
    x_t = (1 - t) * x0 + t * noise        target velocity v = noise - x0
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import torch.nn.functional as F

from .base import check_guidance, check_size

# velocity(x_t (B, C, H, W), t (B,)) -> v (B, C, H, W)
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Guidance and the scheduler update in fp32 (or in float64 when the model runs in it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RectifiedFlow:
    """Logit-normal time sampling, caption dropout draws for CFG, MSE on the velocity, guided sampling."""

    def __init__(self, t_mean: float = 0.0, t_std: float = 1.0, caption_dropout: float = 0.1):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.t_mean = t_mean
        self.t_std = t_std
        self.caption_dropout = caption_dropout

    def sample_t(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """t = sigmoid(N(mean, std)): logit-normal, concentrating training on mid-range noise. -> (B,)"""
        z = torch.randn(batch_size, generator=generator, device=device)
        return torch.sigmoid(self.t_mean + self.t_std * z)

    def drop_mask(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Which of `batch_size` captions to replace by the null
        prompt (teaches the unconditional branch). -> (B,) bool"""
        return torch.rand(batch_size, generator=generator, device=device) < self.caption_dropout

    def loss(
        self,
        velocity: VelocityFn,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared velocity error at a random time for each clean sample x0 (B, C, H, W).

        t (B,) and noise (B, C, H, W) are drawn from `generator` unless given (the trainer draws them
        for the global batch so that results do not depend on the number of processes).
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - tb) * x0 + tb * noise
        return F.mse_loss(velocity(x_t, t).float(), (noise - x0).float())

    @staticmethod
    @torch.no_grad()
    def sample(
        velocity: VelocityFn,
        noise: torch.Tensor,
        scheduler: Any,
        steps: int,
        guidance_scale: float,
        on_step: Callable[[], None] | None = None,
        on_state: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Integrate from noise (t = 1) to data (t = 0) with the given diffusers flow-matching scheduler.

        The scheduler is copied, so the caller's is never stepped; each of its timesteps is handed to the
        model as t = timestep / num_train_timesteps (a second-order scheduler such as Heun visits some
        twice). With guidance_scale != 1, `velocity` is called on the batch doubled as [x; x] and must
        return [conditional; unconditional] velocities, combined as v_u + w (v_c - v_u).
        on_step: called after every scheduler step (progress bars).
        on_state: called as on_state(t (B,), x_t) before every model evaluation of the trajectory (tracing).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(steps, device=noise.device)
        guided = guidance_scale != 1.0
        x = noise
        for timestep in scheduler.timesteps:
            t = (timestep / scheduler.config.num_train_timesteps).to(noise.device).expand(x.shape[0]).float()
            if on_state is not None:
                on_state(t, x)
            if guided:
                v_cond, v_uncond = _at_least_fp32(velocity(torch.cat([x, x]), torch.cat([t, t]))).chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                v = _at_least_fp32(velocity(x, t))
            x = scheduler.step(v, timestep, x).prev_sample
            if on_step is not None:
                on_step()
        return x


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of SD3 / diffusers' flow-matching
    schedulers: s t / (1 + (s - 1) t); s > 1 reads noisier."""
    return shift * t / (1 + (shift - 1) * t)


def flow_schedulers() -> list[str]:
    """The diffusers flow-matching scheduler classes a `SampleConfig` may name."""
    return sorted(
        name for name in dir(diffusers) if name.startswith("FlowMatch") and name.endswith("Scheduler")
    )


@dataclass
class SampleConfig:
    """How images are sampled, saved with every checkpoint: the
    default of `sample`, `eval`, `sample-bench` and the pipeline."""

    # A diffusers flow-matching scheduler class (FlowMatchEulerDiscreteScheduler,
    # FlowMatchHeunDiscreteScheduler, ...).
    scheduler: str = "FlowMatchEulerDiscreteScheduler"
    steps: int = 25
    guidance_scale: float = 3.0
    # Time shift of the schedule (1 = none); > 1 spends more steps at high noise.
    shift: float = 1.0
    # Images per prompt in sample grids, the demo and ShapesBench.
    images_per_prompt: int = 4
    # Time shift of the t that nominal time gates (strategies time, joint) read, at sampling only: the gate
    # reads shift_time(t, gate_shift) while the schedule and the DiT keep t (1 = the nominal t, the paper;
    # the paper's manual repair of the gate/trajectory mismatch, no retraining).
    gate_shift: float = 1.0

    def __post_init__(self) -> None:
        if not self.gate_shift > 0:
            raise ValueError(f"sample.gate_shift must be > 0 (1 = the nominal t), got {self.gate_shift}")
        if self.images_per_prompt < 1 or self.shift <= 0:
            raise ValueError(
                f"sample.images_per_prompt must be >= 1 and sample.shift > 0, "
                f"got {self.images_per_prompt}, {self.shift}"
            )
        check_guidance(self.guidance_scale, "sample.guidance_scale")
        if self.steps < 1:
            raise ValueError(f"sample.steps must be >= 1, got {self.steps}")
        check_size(self.steps, "sample.steps", "sampling_steps")
        check_size(self.images_per_prompt, "sample.images_per_prompt", "images_per_prompt")
        if self.scheduler not in flow_schedulers():
            raise ValueError(
                f"sample.scheduler {self.scheduler!r} is not a diffusers flow-matching scheduler; "
                f"valid: {', '.join(flow_schedulers())}"
            )

    def make_scheduler(self) -> Any:
        return getattr(diffusers, self.scheduler)(num_train_timesteps=1000, shift=self.shift)

    def scheduler_calls(self) -> int:
        """Model evaluations per image and guidance branch: the
        scheduler's timesteps for `steps` (Heun: 2 steps - 1)."""
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(self.steps)
        return len(scheduler.timesteps)
