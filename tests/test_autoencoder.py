"""`semroute autoencoder`: a diffusers AutoencoderKL trained on a manifest, saved so that dataset.vae loads
it, with latents of unit scale, exact resume and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from semroute.autoencoder import (
    REPORT_FILE,
    STATE_DIR,
    AutoencoderSettings,
    build_autoencoder,
    load_images,
    psnr,
    reconstruct,
    train_autoencoder,
)
from semroute.cli import main
from semroute.latent import check_vae_matches, encode_latents, load_vae


def blob_manifest(root: Path, n: int = 24, size: int = 24, name: str = "train.jsonl", seed: int = 0) -> Path:
    """n images of a coloured disc on a transparent ground (RGBA), at random places: easy to reconstruct."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n):
        array = np.zeros((size, size, 4), np.uint8)
        cy, cx, r = rng.integers(6, size - 6, 2).tolist() + [int(rng.integers(3, 6))]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        array[disc] = [*rng.integers(0, 256, 3).tolist(), 255]
        Image.fromarray(array, "RGBA").save(root / "img" / f"{name}-{i}.png")
        rows.append({"image": f"img/{name}-{i}.png", "text": f"disc {i}"})
    path = root / name
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


SMALL = dict(resolution=16, downsample=2, latent_channels=4, width=8, batch_size=8, lr=3e-3)


def test_settings_are_checked_with_the_fix_in_the_message():
    with pytest.raises(ValueError, match="power of two"):
        AutoencoderSettings(downsample=3)
    with pytest.raises(ValueError, match="divisible by --downsample 8"):
        AutoencoderSettings(resolution=36, downsample=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        AutoencoderSettings(width=12)
    assert AutoencoderSettings(downsample=8, width=16).block_channels() == (16, 32, 64, 64)


def test_training_saves_a_vae_that_dataset_vae_loads_with_unit_scale_latents(tmp_path):
    manifest = blob_manifest(tmp_path)
    out = tmp_path / "ae"
    settings = AutoencoderSettings(epochs=6, **SMALL)
    report = train_autoencoder(manifest, None, out, settings)
    vae = load_vae(out)  # the loader every SD/SD3/FLUX VAE directory goes through
    check_vae_matches(vae, in_channels=4, sample_size=8, resolution=16)
    images = load_images(manifest, settings, "test")
    # Composited onto white: the transparent ground reads as 255, not as the zeros the RGBA pixels hold.
    assert images[:, :, 0, 0].min() == 255
    # Shift and scale were measured so that the DiT sees latents of zero mean and unit std.
    latents = encode_latents(vae, images.float() / 127.5 - 1)
    assert abs(latents.mean().item()) < 1e-3 and latents.std().item() == pytest.approx(1.0, rel=1e-2)
    assert report["latent_shape"] == [4, 8, 8] and report["train_images"] == 24
    # It learned: reconstructions are far better than the untrained network's.
    torch.manual_seed(0)
    untrained = build_autoencoder(settings).eval()
    real = images.float() / 255
    assert psnr(reconstruct(vae, images), real).mean() > psnr(reconstruct(untrained, images), real).mean() + 5


def test_a_resumed_training_equals_an_uninterrupted_one(tmp_path):
    manifest = blob_manifest(tmp_path, n=12)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_autoencoder(manifest, None, straight, AutoencoderSettings(epochs=2, **SMALL))
    train_autoencoder(manifest, None, resumed, AutoencoderSettings(epochs=1, **SMALL))
    assert json.loads((resumed / STATE_DIR / "state.json").read_text())["epochs_done"] == 1
    train_autoencoder(manifest, None, resumed, AutoencoderSettings(epochs=2, **SMALL))
    a = load_file(straight / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_saved_training_of_other_settings_is_refused_not_overwritten(tmp_path):
    manifest = blob_manifest(tmp_path, n=8)
    out = tmp_path / "ae"
    train_autoencoder(manifest, None, out, AutoencoderSettings(epochs=2, **SMALL))
    before = (out / STATE_DIR / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="other settings or data.*another --out"):
        train_autoencoder(manifest, None, out, AutoencoderSettings(epochs=2, **{**SMALL, "lr": 1e-4}))
    with pytest.raises(ValueError, match="already holds 2 epochs, more than --epochs 1; ask for at least 2"):
        train_autoencoder(manifest, None, out, AutoencoderSettings(epochs=1, **SMALL))
    assert (out / STATE_DIR / "model.safetensors").read_bytes() == before


def test_the_command_reports_held_out_quality_beside_its_references(tmp_path, capsys):
    train = blob_manifest(tmp_path, n=16)
    held = blob_manifest(tmp_path, n=8, name="heldout.jsonl", seed=1)
    out = tmp_path / "ae"
    args = ["autoencoder", "--train", str(train), "--heldout", str(held), "--out", str(out)]
    args += ["--resolution", "16", "--downsample", "2", "--width", "8", "--epochs", "2", "--batch-size", "8"]
    assert main(args) in (None, 0)
    report = json.loads((out / REPORT_FILE).read_text())
    held_out = report["heldout"]
    assert held_out["images"] == 8 and np.isfinite(held_out["psnr_db"])
    assert held_out["fd"] >= 0 and held_out["reference_resized_fd"] >= 0
    assert f"use it with dataset: {{vae: {out}}}" in capsys.readouterr().out
    assert main(["autoencoder", "--train", str(train), "--out", str(out), "--downsample", "6"]) == 2
    assert "power of two" in capsys.readouterr().err
