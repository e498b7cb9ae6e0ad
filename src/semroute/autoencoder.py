"""Train a small diffusers AutoencoderKL on a manifest's images, for latent DiT training where no pretrained
VAE can be had.

The result is an ordinary `save_pretrained` directory: `dataset.vae` loads it exactly like the VAE folder of
an SD, SD3 or FLUX checkpoint. Its `shift_factor` and `scaling_factor` are measured on the training latents
(mean and 1 / std of the posterior mode), so the DiT sees latents of unit scale as SD3's recipe intends.

Training resumes: every epoch ends with the weights and optimiser in `OUT/.training/`, and a re-run with
the same settings and data continues from there. The held-out report (`OUT/report.json`) gives PSNR and the
judge network's Frechet distance of the reconstructions, beside two references computed the same way: the
images shrunk to the latent grid's size and enlarged back (what the latents' pixel count alone would give)
and the real images' own split-half distance.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data.images import DatasetConfig, ImageCaptionDataset, collate_skipping
from .fileio import file_digest, read_json, write_json
from .latent import load_vae

logger = logging.getLogger(__name__)

STATE_DIR = ".training"
REPORT_FILE = "report.json"
MAX_DOWNSAMPLE = 32


@dataclass
class AutoencoderSettings:
    """What the autoencoder is and how it trains. A saved training continues only under the same settings
    (more --epochs extend it)."""

    resolution: int = 64
    downsample: int = 4  # image side / latent side: a power of two
    latent_channels: int = 4
    width: int = 16  # channels at full resolution; each lower level has twice as many, at most 4x
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    background: str = "white"

    def __post_init__(self) -> None:
        d = self.downsample
        if d < 1 or d > MAX_DOWNSAMPLE or d & (d - 1):
            raise ValueError(f"--downsample must be a power of two from 1 to {MAX_DOWNSAMPLE}, got {d}")
        if self.resolution < 8 or self.resolution > 1024 or self.resolution % d:
            raise ValueError(
                f"--resolution must be 8..1024 and divisible by --downsample {d}, got {self.resolution}"
            )
        for name in ("latent_channels", "width", "epochs", "batch_size"):
            value = getattr(self, name)
            if not 1 <= value <= 100_000:
                raise ValueError(f"--{name.replace('_', '-')} must be 1..100000, got {value}")
        if self.width % 8:
            raise ValueError(f"--width must be a multiple of 8 (the group norm's groups), got {self.width}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (
            math.isfinite(self.kl_weight) and self.kl_weight >= 0
        ):
            raise ValueError(f"--lr must be > 0 and --kl-weight >= 0, got {self.lr} and {self.kl_weight}")

    def block_channels(self) -> tuple[int, ...]:
        levels = int(math.log2(self.downsample)) + 1
        return tuple(self.width * min(2**i, 4) for i in range(levels))


def build_autoencoder(settings: AutoencoderSettings) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL that maps resolution-px RGB to (latent_channels,
    resolution / downsample, ...) latents: one ResNet block per level, attention in the middle."""
    channels = settings.block_channels()
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=settings.latent_channels,
        norm_num_groups=8,
        sample_size=settings.resolution,
    )


def load_images(manifest: Path, settings: AutoencoderSettings, what: str) -> torch.Tensor:
    """Every usable image of a manifest at the training resolution, (N, 3, R, R) uint8 (compact in memory;
    3,000 images of 64 px take 38 MB)."""
    config = DatasetConfig(
        manifest=str(manifest), resolution=settings.resolution, background=settings.background
    )
    dataset = ImageCaptionDataset(config)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate_skipping)
    out = []
    for batch in tqdm(loader, desc=f"reading {what} images", unit="batch", leave=False):
        if batch is not None:
            out.append(((batch[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    if not out:
        raise ValueError(f"{what} manifest {manifest} has no readable image")
    return torch.cat(out)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1


def _loss(model: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, float]:
    posterior = model.encode(x).latent_dist
    reconstruction = model.decode(posterior.sample()).sample
    l1 = (reconstruction - x).abs().mean()
    return l1 + kl_weight * posterior.kl().mean(), float(l1.detach())


def _identity(settings: AutoencoderSettings, manifest: Path) -> dict:
    """What a saved training state must match to be continued: everything but the epoch count (more epochs
    extend a finished training)."""
    made_by = {k: v for k, v in asdict(settings).items() if k != "epochs"}
    return {"settings": made_by, "manifest_sha256": file_digest(manifest)}


def _resume(state_dir: Path, identity: dict, model: AutoencoderKL, optimizer: torch.optim.Optimizer) -> int:
    """Load the state a killed or finished training left, if it was made by the same settings and data;
    return the number of finished epochs."""
    if not (state_dir / "state.json").is_file():
        return 0
    state = read_json(
        state_dir / "state.json", "autoencoder training state", f"remove {state_dir} to train from scratch"
    )
    if state.get("identity") != identity:
        raise ValueError(
            f"{state_dir} holds a training with other settings or data ({state.get('identity')}); "
            f"use another --out, or remove {state_dir} to start again"
        )
    model.load_state_dict(load_file(state_dir / "model.safetensors"))
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(state_dir / "rng.pt", weights_only=True))
    return int(state["epochs_done"])


def _save_state(
    state_dir: Path, identity: dict, model: AutoencoderKL, optimizer: torch.optim.Optimizer, epochs: int
) -> None:
    """The weights, optimiser and RNG after `epochs`, swapped in whole so a kill leaves the previous one."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    write_json(tmp / "state.json", {"identity": identity, "epochs_done": epochs})
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        state_dir.rename(old)
    tmp.rename(state_dir)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def latent_factors(model: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(shift, scale): the mean and 1 / std of the posterior modes of `images`."""
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, len(images), batch_size):
        z = model.encode(to_unit(images[i : i + batch_size])).latent_dist.mode().double()
        total, total_sq, count = total + float(z.sum()), total_sq + float((z**2).sum()), count + z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 1e-12))
    return mean, 1.0 / std


@torch.no_grad()
def reconstruct(model: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 images -> their reconstructions through the posterior mode, float in [0, 1]."""
    out = []
    for i in range(0, len(images), batch_size):
        z = model.encode(to_unit(images[i : i + batch_size])).latent_dist.mode()
        out.append((model.decode(z).sample.float().clamp(-1, 1) + 1) / 2)
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], (N, 3, H, W) each."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-12))


def train_autoencoder(
    train_manifest: Path, heldout_manifest: Path | None, out: Path, settings: AutoencoderSettings
) -> dict:
    """Train (or resume), save with save_pretrained into `out`, score on the held-out images; the report."""
    torch.manual_seed(settings.seed)
    identity = _identity(settings, train_manifest)
    images = load_images(train_manifest, settings, "training")
    model = build_autoencoder(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    state_dir = out / STATE_DIR
    done = _resume(state_dir, identity, model, optimizer)
    steps_per_epoch = math.ceil(len(images) / settings.batch_size)
    if done > settings.epochs:
        raise ValueError(
            f"{state_dir} already holds {done} epochs, more than --epochs {settings.epochs}; ask for at "
            f"least {done}, or use another --out"
        )
    if done:
        logger.info("resuming the autoencoder after %d of %d epochs", done, settings.epochs)
    started, trained = time.perf_counter(), 0
    model.train()
    for epoch in range(done, settings.epochs):
        order = torch.randperm(len(images))
        bar = tqdm(range(steps_per_epoch), desc=f"autoencoder epoch {epoch + 1}/{settings.epochs}")
        for step in bar:
            batch = to_unit(images[order[step * settings.batch_size : (step + 1) * settings.batch_size]])
            loss, l1 = _loss(model, batch, settings.kl_weight)
            if not math.isfinite(float(loss)):
                raise FloatingPointError(
                    f"the autoencoder's loss became {float(loss)} in epoch {epoch + 1}; lower --lr "
                    f"(now {settings.lr}); the last good epoch is kept in {state_dir}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            trained += len(batch)
            bar.set_postfix(l1=f"{l1:.4f}")
        _save_state(state_dir, identity, model, optimizer, epoch + 1)
    train_seconds = time.perf_counter() - started
    model.eval()
    shift, scale = latent_factors(model, images)
    model.register_to_config(shift_factor=shift, scaling_factor=scale)
    tmp = out / ".pretrained.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp / name).replace(out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "settings": asdict(settings),
        "train_manifest": str(train_manifest),
        "train_images": len(images),
        "latent_shape": [settings.latent_channels, *[settings.resolution // settings.downsample] * 2],
        "shift_factor": shift,
        "scaling_factor": scale,
        "parameters": sum(p.numel() for p in model.parameters()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "train_seconds_this_session": round(train_seconds, 1),
        "train_images_per_second": round(trained / train_seconds, 1) if trained else None,
    }
    if heldout_manifest is not None:
        report["heldout"] = score_autoencoder(out, heldout_manifest, settings)
    write_json(out / REPORT_FILE, report)
    return report


def score_autoencoder(vae_dir: Path, manifest: Path, settings: AutoencoderSettings) -> dict:
    """PSNR and judge FD of the saved autoencoder's held-out reconstructions, with the references."""
    from .bench.image_metrics import frechet_distance, split_half_fd
    from .bench.judge import ImageJudge

    model = load_vae(vae_dir)
    images = load_images(manifest, settings, "held-out")
    real = images.float() / 255
    started = time.perf_counter()
    recon = reconstruct(model, images)
    codec_seconds = time.perf_counter() - started
    side = settings.resolution // settings.downsample
    shrunk = F.interpolate(real, size=(side, side), mode="bicubic", antialias=True)
    resized = F.interpolate(shrunk, size=real.shape[-2:], mode="bicubic").clamp(0, 1)
    judge = ImageJudge()
    real_f, recon_f, resized_f = judge.features(real), judge.features(recon), judge.features(resized)
    return {
        "manifest": str(manifest),
        "images": len(images),
        "psnr_db": float(psnr(recon, real).mean()),
        "fd": frechet_distance(recon_f, real_f),
        "reference_resized_psnr_db": float(psnr(resized, real).mean()),
        "reference_resized_fd": frechet_distance(resized_f, real_f),
        "real_split_half_fd": split_half_fd(real_f),
        "encode_decode_images_per_second": round(len(images) / codec_seconds, 1),
    }


def settings_of(args: object) -> AutoencoderSettings:
    """The settings from parsed command-line options of the same names."""
    return AutoencoderSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(AutoencoderSettings)}
    )
