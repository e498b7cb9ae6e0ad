"""Real-data paths at tiny scale: manifests, HF datasets, the VAE, the feature cache, training from each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semroute.config import load_config
from semroute.data.cache import CachedDataset
from semroute.data.images import (
    BadImageError,
    DatasetConfig,
    ImageCaptionDataset,
    collate_skipping,
    to_rgb,
    to_training_tensor,
)
from semroute.fusion import LayerFusion
from semroute.latent import check_vae_matches, decode_latents, encode_latents, load_vae
from semroute.precompute import precompute

from .conftest import tiny_run_config, write_image_folder


def image_run_config(tiny_llama_dir, dataset: dict, **train) -> dict:
    """16 px images: in pixel space, or through the tiny VAE into 8x8x4 latents."""
    config = tiny_run_config(tiny_llama_dir, **train)
    config["model"].update(sample_size=8, in_channels=4) if "vae" in dataset else config["model"].update(
        sample_size=16
    )
    config["dataset"] = {"resolution": 16, **dataset}
    return config


def _over(colour, alpha, background):
    """Straight-alpha 'over' in 8 bits, computed by hand: the reference for compositing."""
    return [round((c * alpha + b * (255 - alpha)) / 255) for c, b in zip(colour, background, strict=True)]


def test_transparent_pixels_are_composited_onto_the_background_in_every_alpha_mode():
    # Transparent pixels store pure red: dropping alpha (what convert("RGB") does) would train on red.
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[:2, :, 3] = 0  # top half fully transparent
    rgba[2:, :2, 3] = 255  # bottom-left opaque
    rgba[2:, 2:, 3] = 128  # bottom-right half transparent
    image = Image.fromarray(rgba, "RGBA")
    for background in [(255, 255, 255), (0, 0, 0), (10, 200, 30)]:
        out = np.asarray(to_rgb(image, background)).astype(int)
        assert out[0, 0].tolist() == list(background)
        assert out[3, 0].tolist() == [255, 0, 0]
        assert np.abs(out[3, 3] - _over((255, 0, 0), 128, background)).max() <= 1
    # The same through the training transform: [-1, 1] values of the composited pixels.
    x = to_training_tensor(image, 4, (0, 0, 0))
    assert torch.equal(x[:, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    # LA and a palette image with a transparent index behave the same; images without alpha are untouched.
    la = Image.fromarray(
        np.stack([np.full((2, 2), 90, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], -1), "LA"
    )
    assert np.asarray(to_rgb(la, (255, 255, 255)))[:, :, 0].tolist() == [[255, 90], [90, 255]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette, (0, 255, 0))).tolist() == [[[0, 255, 0], [0, 0, 255]]]
    plain = Image.fromarray(rgba[..., :3], "RGB")
    assert np.array_equal(np.asarray(to_rgb(plain, (0, 0, 0))), rgba[..., :3])


def test_a_manifest_of_rgba_pngs_trains_on_composited_pixels(tmp_path):
    """The dataset (and so training and precompute) reads RGBA files composited onto dataset.background."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 1] = 255  # green, invisible where alpha is 0
    rgba[4:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "emoji.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "emoji.png", "text": "a green bar"}))
    for background, top in (("white", 1.0), ("#000000", -1.0)):
        config = DatasetConfig(manifest=str(tmp_path / "data.jsonl"), resolution=8, background=background)
        x, caption = ImageCaptionDataset(config)[0]
        assert caption == "a green bar"
        assert torch.allclose(x[:, :3, :], torch.full((3, 3, 8), top))  # the transparent rows
        assert torch.allclose(x[:, 5:, :], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 3, 8))
    with pytest.raises(ValueError, match="dataset.background must be a colour name or #rrggbb, got 'nope'"):
        DatasetConfig(manifest=str(tmp_path / "data.jsonl"), background="nope")


def test_resize_and_center_crop_against_pil():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (10, 30, 3), dtype=np.uint8)  # H 10, W 30: the shorter side is already 10
    out = to_training_tensor(Image.fromarray(array), 10)
    assert out.shape == (3, 10, 10)
    expected = torch.from_numpy(array[:, 10:20].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(out, expected)
    tall = to_training_tensor(Image.fromarray(array).transpose(Image.Transpose.TRANSPOSE), 5)
    reference = (
        Image.fromarray(array)
        .transpose(Image.Transpose.TRANSPOSE)
        .resize((5, 15), Image.BICUBIC)
        .crop((0, 5, 5, 10))
    )
    torch.testing.assert_close(
        tall, torch.from_numpy(np.asarray(reference, np.float32) / 127.5 - 1).permute(2, 0, 1)
    )


def test_manifest_rows_captions_and_skips(tmp_path, manifest):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows.append({"image": "img/missing.png", "text": "gone"})
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    rows.append({"image": "img/broken.png", "text": "broken"})
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(rows))
    data = ImageCaptionDataset(DatasetConfig(manifest=str(listed), resolution=8))
    assert len(data) == 7 and len(data.skips) == 1  # the missing file is found up front
    image, text = data[0]
    assert image.shape == (3, 8, 8) and image.min() >= -1 and image.max() <= 1 and text == "one red squares"
    assert data[1][1] in ("two red squares", "a blue circle")
    assert data[6] is None and len(data.skips) == 2  # the broken file is found when read
    images, texts = collate_skipping([data[0], data[6], data[2]])
    assert images.shape == (2, 3, 8, 8) and texts == ["one red squares", "three red squares"]
    assert collate_skipping([None]) is None
    with pytest.raises(BadImageError, match="missing.png: file not found.*strict: false"):
        ImageCaptionDataset(DatasetConfig(manifest=str(listed), strict=True))


def test_caption_choice_is_seeded_and_varies_by_epoch(manifest):
    data = ImageCaptionDataset(DatasetConfig(manifest=str(manifest), resolution=8), seed=3)
    picks = []
    for epoch in range(12):
        data.epoch = epoch
        picks.append(data[1][1])
    assert set(picks) == {"two red squares", "a blue circle"}
    data.epoch = 5
    assert data[1][1] == picks[5]


def test_manifest_errors_name_the_problem(tmp_path, manifest):
    with pytest.raises(ValueError, match="needs keys 'path' and 'text'"):
        ImageCaptionDataset(DatasetConfig(manifest=str(manifest), image_key="path"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "img/0.png", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ImageCaptionDataset(DatasetConfig(manifest=str(bad)))
    bad.write_text('{"image": "img/0.png", "text": [1, 2]}\n')
    with pytest.raises(ValueError, match="string or a non-empty list of strings"):
        ImageCaptionDataset(DatasetConfig(manifest=str(bad)))
    with pytest.raises(ValueError, match="set one of manifest, hf_dataset or cache"):
        DatasetConfig(manifest="a.json", cache="c")


def test_custom_keys_and_hf_dataset_on_disk(tmp_path, manifest):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps([{"file": r["image"], "caption": r["text"]} for r in rows]))
    by_keys = ImageCaptionDataset(
        DatasetConfig(manifest=str(renamed), image_key="file", text_key="caption", resolution=8)
    )
    images = [Image.open(tmp_path / r["image"]).convert("RGB") for r in rows]
    # Arrow: one type a column
    captions = [r["text"] if isinstance(r["text"], list) else [r["text"]] for r in rows]
    hf = datasets.Dataset.from_dict({"picture": images, "caption": captions})
    hf = hf.cast_column("picture", datasets.Image())
    hf.save_to_disk(str(tmp_path / "hf"))
    from_hf = ImageCaptionDataset(
        DatasetConfig(hf_dataset=str(tmp_path / "hf"), image_key="picture", text_key="caption", resolution=8)
    )
    assert len(from_hf) == len(by_keys) == 6
    for i in range(6):
        torch.testing.assert_close(from_hf[i][0], by_keys[i][0])
        assert from_hf[i][1] == by_keys[i][1]
    with pytest.raises(ValueError, match="no 'text'"):
        ImageCaptionDataset(DatasetConfig(hf_dataset=str(tmp_path / "hf"), image_key="picture"))


def test_vae_factors_and_round_trip_shapes(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = encode_latents(vae, pixels)
    expected = (vae.encode(pixels).latent_dist.mode() - 0.1) * 1.5
    torch.testing.assert_close(latents, expected)
    assert latents.shape == (2, 4, 8, 8)
    decoded = decode_latents(vae, latents)
    torch.testing.assert_close(decoded, vae.decode(latents / 1.5 + 0.1).sample)
    check_vae_matches(vae, 4, 8, 16)
    with pytest.raises(ValueError, match="set model.in_channels: 4"):
        check_vae_matches(vae, 3, 8, 16)
    with pytest.raises(ValueError, match="set model.sample_size: 8"):
        check_vae_matches(vae, 4, 16, 16)
    with pytest.raises(FileNotFoundError, match="AutoencoderKL config.json"):
        load_vae(tiny_vae_dir / "nowhere")


def test_precompute_rows_match_direct_encoding_and_refuse_mixing(
    tmp_path, manifest, tiny_llama_dir, tiny_vae_dir, tiny_encoder
):
    raw = image_run_config(tiny_llama_dir, {"manifest": str(manifest), "vae": str(tiny_vae_dir)})
    config = load_config(raw)
    out = tmp_path / "cache"
    meta = precompute(config, out, shard_size=4, dtype="fp32", progress=False, encoder=tiny_encoder)
    assert meta["complete"] and meta["rows"] == 9  # 6 images, 3 with two captions
    assert [s["rows"] for s in meta["shards"]] == [4, 4, 1]
    cached = CachedDataset(out)
    data = ImageCaptionDataset(config.dataset)
    vae = load_vae(tiny_vae_dir)
    latents, text = cached[1]  # image 1, first caption (image 0 has one)
    torch.testing.assert_close(latents, encode_latents(vae, data[1][0][None])[0])
    hidden, m = tiny_encoder([data.captions_of(1)[0]])
    # The row holds the caption's own tokens, no padding up to max_length (16)
    assert m.all() and text.shape[1] == m.shape[1] < 16
    torch.testing.assert_close(text, LayerFusion.normalize(hidden)[:, 0])
    # Re-running with the same recipe is a no-op; another recipe is refused, not mixed in.
    assert (
        precompute(config, out, shard_size=4, dtype="fp32", progress=False, encoder=tiny_encoder)["rows"] == 9
    )
    with pytest.raises(ValueError, match="shard_size: cache has 4, this run has 3"):
        precompute(config, out, shard_size=3, dtype="fp32", progress=False, encoder=tiny_encoder)
    manifest.write_text(manifest.read_text() + "\n")  # other content, same path: another question
    with pytest.raises(ValueError, match="source: cache has"):
        precompute(config, out, shard_size=4, dtype="fp32", progress=False, encoder=tiny_encoder)
    raw["text_encoder"]["max_length"] = 12
    from semroute.text_encoder import TextEncoder, TextEncoderConfig

    other = TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), max_length=12))
    with pytest.raises(ValueError, match="max_length: cache has 16, this run has 12"):
        precompute(load_config(raw), out, shard_size=4, dtype="fp32", progress=False, encoder=other)
    assert CachedDataset(out).meta["rows"] == 9


def test_a_precompute_killed_midway_resumes_from_its_shards(tmp_path, tiny_llama_dir, tiny_encoder):
    """A real `semroute precompute` SIGKILLed once some shards exist: the cache reads as incomplete, and the
    same command then finishes it with rows equal to an uninterrupted precompute's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = write_image_folder(tmp_path / "data", n=40)
    (tmp_path / "data" / "train.json").write_text(json.dumps(rows))
    raw = image_run_config(tiny_llama_dir, {"manifest": str(tmp_path / "data" / "train.json")})
    raw["train"]["mixed_precision"] = "fp32"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cache"
    command = [
        sys.executable,
        "-m",
        "semroute",
        "precompute",
        "--config",
        str(config),
        "--out",
        str(out),
        "--shard-size",
        "1",
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(list(out.glob("shard_*"))) < 5:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(out.glob("shard_*")))
    assert 5 <= done < 60, f"killed after {done} of 60 shards"
    with pytest.raises(ValueError, match="incomplete"):
        CachedDataset(out)
    assert (
        subprocess.run(command, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        == 0
    )
    reference = precompute(
        load_config(raw),
        tmp_path / "reference",
        shard_size=1,
        dtype="fp32",
        progress=False,
        encoder=tiny_encoder,
    )
    a, b = CachedDataset(out), CachedDataset(tmp_path / "reference")
    assert a.meta["rows"] == reference["rows"] == 60 and not list(out.glob(".*.tmp"))
    for i in range(len(a)):
        for x, y in zip(a[i], b[i], strict=True):
            torch.testing.assert_close(x, y)


def test_training_from_a_cache_never_runs_the_llm_or_the_vae(
    tmp_path, manifest, tiny_llama_dir, tiny_vae_dir, tiny_encoder, monkeypatch
):
    from diffusers import AutoencoderKL

    from semroute.text_encoder import TextEncoder
    from semroute.train import train

    raw = image_run_config(
        tiny_llama_dir, {"manifest": str(manifest), "vae": str(tiny_vae_dir)}, max_steps=3, batch_size=4
    )
    precompute(load_config(raw), tmp_path / "cache", progress=False, encoder=tiny_encoder)
    raw["dataset"] = {"cache": str(tmp_path / "cache"), "resolution": 16, "vae": str(tiny_vae_dir)}

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached run called the LLM or the VAE")

    monkeypatch.setattr(TextEncoder, "__init__", forbidden)
    monkeypatch.setattr(TextEncoder, "forward", forbidden)
    monkeypatch.setattr(AutoencoderKL, "encode", forbidden)
    monkeypatch.setattr(AutoencoderKL, "forward", forbidden)
    result = train(load_config(raw), tmp_path / "run", progress=False)
    assert result.steps == 3 and np.isfinite(result.final_loss)
    stored = json.loads((result.checkpoint / "text_encoder.json").read_text())
    assert stored["resolved_layers"] == [1, 2, 3, 4] and stored["max_length"] == 16
    assert json.loads((result.checkpoint / "vae.json").read_text())["path"] == str(tiny_vae_dir)
    # A config that reads the LLM differently is refused with the differences listed.
    raw["text_encoder"]["layers"] = [-1]
    with pytest.raises(ValueError, match=r"text_layers: cache has \[1, 2, 3, 4\], this run has \[4\]"):
        train(load_config(raw), tmp_path / "run2", progress=False)


def test_training_on_images_through_the_vae_counts_skipped_images(
    tmp_path, manifest, tiny_llama_dir, tiny_vae_dir, tiny_encoder
):
    from semroute.pipeline import SemanticRoutingPipeline
    from semroute.train import train

    rows = [json.loads(line) for line in manifest.read_text().splitlines()] + [
        {"image": "img/gone.png", "text": "x"}
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    raw = image_run_config(
        tiny_llama_dir,
        {"manifest": str(manifest), "vae": str(tiny_vae_dir)},
        max_steps=4,
        batch_size=4,
        gradient_accumulation_steps=2,
    )
    result = train(load_config(raw), tmp_path / "run", progress=False, encoder=tiny_encoder)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result.skipped_images == summary["skipped_images"] == 1 and "gone.png" in next(
        iter(summary["skipped"])
    )
    # 4 steps x 2 micro-batches; 6 images give one full batch of 4 an epoch
    assert summary["epochs_started"] == 8
    state = json.loads((result.checkpoint / "training_state" / "state.json").read_text())
    assert state["step"] == 4 and state["ema_optimization_step"] == 4  # one EMA update per optimizer step
    pipe = SemanticRoutingPipeline.from_checkpoint(result.checkpoint)
    assert pipe.vae is not None
    assert pipe.generate(["one red squares"], 2, 2.0).shape == (1, 3, 16, 16)


def test_pixel_space_dataset_needs_matching_model_size(tiny_llama_dir, manifest):
    raw = image_run_config(tiny_llama_dir, {"manifest": str(manifest)})
    raw["model"]["sample_size"] = 8
    with pytest.raises(ValueError, match="needs model.sample_size 16"):
        load_config(raw)
