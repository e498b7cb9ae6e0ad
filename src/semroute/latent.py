"""Latent space: a diffusers AutoencoderKL from a local directory, with the shift and scale of its config.

The DiT sees (vae latent - shift_factor) * scaling_factor, as SD3 trains; pixel space (no VAE) sees
images in [-1, 1] directly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL


def vae_dir(path: str | Path) -> Path:
    """The directory of the AutoencoderKL's config.json: `path`, or a diffusers pipeline's vae/ folder."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    raise FileNotFoundError(
        f"VAE {path} is not a directory with an AutoencoderKL config.json (or a vae/ folder)"
    )


def latent_shape(path: str | Path | None, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of what a cache stores per image, from the VAE's config alone (pixels without a VAE)."""
    if path is None:
        return (3, resolution, resolution)
    config = AutoencoderKL.load_config(vae_dir(path))
    side = resolution // 2 ** (len(config["block_out_channels"]) - 1)
    return (config["latent_channels"], side, side)


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> AutoencoderKL:
    """An AutoencoderKL from a local directory (config.json
    + weights) on `device`, frozen and in eval mode."""
    vae = AutoencoderKL.from_pretrained(vae_dir(path))
    vae.to(device)
    return vae.eval().requires_grad_(False)


def vae_factors(vae: AutoencoderKL) -> tuple[float, float]:
    """(shift, scale) from the VAE's config; SD1/SDXL VAEs have no shift (0)."""
    config = vae.config
    return float(config.get("shift_factor") or 0.0), float(config["scaling_factor"])


def vae_downsample(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config["block_out_channels"]) - 1)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> DiT inputs (B, C,
    H/f, W/f): the posterior mode, shifted and scaled."""
    shift, scale = vae_factors(vae)
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
    return ((latents - shift) * scale).float()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """DiT outputs (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]."""
    shift, scale = vae_factors(vae)
    param = next(vae.parameters())
    return vae.decode((latents / scale + shift).to(param.device, param.dtype)).sample.float()


def check_vae_matches(vae: AutoencoderKL, in_channels: int, sample_size: int, resolution: int) -> None:
    """The DiT must take the VAE's latent channels, at resolution / downsample."""
    channels, factor = vae.config["latent_channels"], vae_downsample(vae)
    if channels != in_channels:
        raise ValueError(
            f"the VAE has {channels} latent channels but model.in_channels is {in_channels}; set "
            f"model.in_channels: {channels}"
        )
    if resolution % factor or resolution // factor != sample_size:
        raise ValueError(
            f"resolution {resolution} through a VAE that downsamples by {factor} gives "
            f"{resolution / factor:g} latents, but model.sample_size is {sample_size}; set "
            f"model.sample_size: {resolution // factor} (and a resolution divisible by {factor})"
        )
