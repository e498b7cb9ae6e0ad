"""Rectified flow: the training loss and the guided Euler sampler. The trainer calls only these.

Convention (t in [0, 1], 1 = pure noise):
    x_t = (1 - t) * x0 + t * noise        target velocity v = noise - x0
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

# velocity(x_t (B, C, H, W), t (B,)) -> v (B, C, H, W)
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Guidance and the Euler update in fp32 (or in float64 when the model runs in it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RectifiedFlow:
    """Logit-normal time sampling, caption dropout for CFG, MSE on the velocity, Euler + CFG sampling."""

    def __init__(self, t_mean: float = 0.0, t_std: float = 1.0, caption_dropout: float = 0.1):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.t_mean = t_mean
        self.t_std = t_std
        self.caption_dropout = caption_dropout

    def sample_t(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """t = sigmoid(N(mean, std)): logit-normal, concentrating training on mid-range noise. -> (B,)"""
        z = torch.randn(batch_size, generator=generator, device=device)
        return torch.sigmoid(self.t_mean + self.t_std * z)

    def drop_mask(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Which of `batch_size` captions to replace by the null prompt (teaches the unconditional branch). -> (B,) bool"""
        return torch.rand(batch_size, generator=generator, device=device) < self.caption_dropout

    def drop_captions(self, caption_ids: torch.Tensor, null_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace a `caption_dropout` fraction of caption ids by the null caption."""
        drop = self.drop_mask(caption_ids.shape[0], generator, caption_ids.device)
        return torch.where(drop, torch.full_like(caption_ids, null_id), caption_ids)

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
        num_steps: int = 25,
        guidance_scale: float = 1.0,
        shift: float = 1.0,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Integrate from noise (t = 1) to data (t = 0) with diffusers' flow-matching Euler schedule.

        With guidance_scale != 1, `velocity` is called on the batch doubled as [x; x] and must return
        [conditional; unconditional] velocities; they are combined as v_u + w (v_c - v_u).
        scheduler: a FlowMatchEulerDiscreteScheduler to use (a copy is stepped); None builds one with `shift`.
        on_step: called after every step (progress bars).
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        scheduler.set_timesteps(num_steps, device=noise.device)
        guided = guidance_scale != 1.0
        x = noise
        for i, timestep in enumerate(scheduler.timesteps):
            t = scheduler.sigmas[i].to(noise.device).expand(x.shape[0]).float()
            if guided:
                v_cond, v_uncond = _at_least_fp32(velocity(torch.cat([x, x]), torch.cat([t, t]))).chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                v = _at_least_fp32(velocity(x, t))
            x = scheduler.step(v, timestep, x).prev_sample
            if on_step is not None:
                on_step()
        return x
