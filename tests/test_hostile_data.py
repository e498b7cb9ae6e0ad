"""Data that fights back: odd image modes and shapes, bombs, broken files, bad captions, paths that climb out.

Each image is either converted correctly (checked against numpy arithmetic on the same pixels) or
skipped and counted; a source with no usable row is an error at start, never a loop.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from semroute.cli import main
from semroute.data.images import DatasetConfig, ImageCaptionDataset, open_image, to_training_tensor

from .test_data import image_run_config

R = 8


def dataset_of(root: Path, rows: list[dict], **config) -> ImageCaptionDataset:
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return ImageCaptionDataset(DatasetConfig(manifest=str(path), resolution=R, **config))


def reference_tensor(rgb8: np.ndarray) -> np.ndarray:
    """What a flat 8-bit RGB image of R x R pixels must become: (3, R, R) in [-1, 1]."""
    return (rgb8.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def flat(mode_value, mode: str, size=(R, R)) -> Image.Image:
    image = Image.fromarray(
        np.full(size[::-1], mode_value, dtype={"I;16": np.uint16, "F": np.float32, "I": np.int32}[mode])
    )
    assert image.mode == mode
    return image


@pytest.mark.parametrize(
    "mode, value, level",
    [
        ("I;16", 65535, 255),
        ("I;16", 32896, 128),
        ("I;16", 0, 0),
        ("F", 1.0, 255),
        ("F", 0.5, 128),
        ("F", 7.0, 255),
        ("F", np.nan, 0),
        ("I", 65535, 255),
    ],
)
def test_16_bit_and_float_images_convert_to_their_8_bit_level(mode, value, level):
    tensor = to_training_tensor(flat(value, mode), R).numpy()
    np.testing.assert_allclose(tensor, reference_tensor(np.full((R, R, 3), level, np.uint8)), atol=1e-6)


def test_a_16_bit_png_file_keeps_its_gradient(tmp_path):
    ramp = (np.arange(R * R, dtype=np.uint32).reshape(R, R) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    image = open_image(tmp_path / "deep.png", R, 10**6)
    got = to_training_tensor(image, R).numpy()
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    np.testing.assert_allclose(got, reference_tensor(np.repeat(expected[..., None], 3, axis=2)), atol=1e-6)


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (3, 40_000)])
def test_extremely_thin_images_resize_with_bounded_memory(size):
    import tracemalloc

    colour = np.array([200, 30, 90], np.uint8)
    image = Image.fromarray(np.broadcast_to(colour, (size[1], size[0], 3)).copy())
    tracemalloc.start()
    tensor = to_training_tensor(image, 64).numpy()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert tensor.shape == (3, 64, 64)
    np.testing.assert_allclose(tensor, reference_tensor(np.broadcast_to(colour, (64, 64, 3))), atol=1e-6)
    # Resizing the 1 px side to 64 first would make a 64 x 6,400,000 image (1.2 GB); the box path never does.
    assert peak < 64 * 2**20, peak


def test_the_box_path_matches_two_step_resizing_closely():
    rng = np.random.default_rng(0)
    # 80 x 2800
    image = Image.fromarray(rng.integers(0, 256, (20, 700, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1))
    direct = to_training_tensor(image, 16).numpy()
    resized = image.resize((560, 16), Image.BICUBIC)
    left = (560 - 16) // 2
    two_step = np.asarray(resized.crop((left, 0, left + 16, 16)), np.float32) / 127.5 - 1
    assert np.abs(direct - two_step.transpose(2, 0, 1)).mean() < 0.06


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height pixels
    (and one tiny data chunk): a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_broken_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((R, R, 3), np.uint8)).save(tmp_path / "img" / "good.png")
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    (tmp_path / "img" / "text.png").write_text("not an image")
    (tmp_path / "img" / "bomb.png").write_bytes(png_claiming(200_000, 200_000))
    (tmp_path / "img" / "big.png").write_bytes(png_claiming(3000, 3000))
    good = (tmp_path / "img" / "good.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(good[: len(good) // 2])
    # A symlink loop: no file at all
    (tmp_path / "img" / "loop.png").symlink_to(tmp_path / "img" / "loop2.png")
    (tmp_path / "img" / "loop2.png").symlink_to(tmp_path / "img" / "loop.png")
    names = ["good", "empty", "text", "bomb", "big", "cut", "loop"]
    data = dataset_of(
        tmp_path, [{"image": f"img/{n}.png", "text": "a red square"} for n in names], max_image_pixels=10**6
    )
    items = [data[i] for i in range(len(data))]
    assert items[0] is not None and items[0][0].shape == (3, R, R)
    assert items[1:] == [None] * 5
    reasons = {Path(k).stem: v for k, v in data.skips.skipped.items()}
    assert set(reasons) == set(names[1:]) and reasons["loop"] == "file not found"
    assert (
        "decompression bomb" in reasons["bomb"]
        and "outside 1..dataset.max_image_pixels (1000000)" in reasons["big"]
    )
    assert all("cannot be decoded" in reasons[n] for n in ("empty", "text", "cut"))


def test_large_jpegs_decode_at_reduced_size(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(
        tmp_path / "big.jpg", quality=90
    )
    image = open_image(tmp_path / "big.jpg", 64, 10**8)
    assert image.size == (200, 150)  # 1/8 scale: still at least 64 on the short side
    assert to_training_tensor(image, 64).shape == (3, 64, 64)


def test_captions_lone_surrogates_are_replaced_and_empty_ones_skipped(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((R, R, 3), np.uint8)).save(tmp_path / "img" / f"{i}.png")
    rows = [
        # Json.dumps writes the lone surrogate as \ud800
        {
            "image": "img/0.png",
            "text": "a red \ud800 square",
        },
        {"image": "img/1.png", "text": ["", "   "]},
        {"image": "img/2.png", "text": ["", "one blue circle"]},
    ]
    data = dataset_of(tmp_path, rows)
    assert len(data) == 2 and len(data.skips) == 1
    assert "every caption is empty" in next(iter(data.skips.skipped.values()))
    assert data.captions_of(0) == ["a red ? square"] and data.captions_of(1) == ["one blue circle"]
    "".join(data.captions_of(0)).encode("utf-8")  # tokenizable: no surrogate left


@pytest.mark.parametrize("name", ["../outside.png", "img/../../outside.png", "{abs}"])
def test_manifest_paths_stay_inside_image_root(tmp_path, name):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    Image.fromarray(np.zeros((R, R, 3), np.uint8)).save(tmp_path / "outside.png")
    rows = [{"image": name.format(abs=tmp_path / "outside.png"), "text": "a red square"}]
    with pytest.raises(ValueError, match="lies outside image_root .* dataset.allow_paths_outside_root: true"):
        dataset_of(root, rows)
    allowed = dataset_of(root, rows, allow_paths_outside_root=True)
    assert allowed[0] is not None


def test_a_source_of_nothing_is_an_error_at_start(tmp_path, tiny_llama_dir, capsys):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(10):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"")
        rows.append({"image": f"img/{i}.png", "text": "a red square"})
    (tmp_path / "data.json").write_text(json.dumps(rows))
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            image_run_config(
                tiny_llama_dir, {"manifest": str(tmp_path / "data.json")}, batch_size=2, max_steps=3
            )
        )
    )
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        "none of the first 10 rows of the dataset can be used (cannot be decoded"
        in err.strip().splitlines()[-1]
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_hf_dataset_whose_image_column_holds_paths_is_an_error_at_start(tmp_path, tiny_llama_dir, capsys):
    import datasets

    datasets.Dataset.from_dict(
        {"image": [f"img/{i}.png" for i in range(6)], "text": ["a red square"] * 6}
    ).save_to_disk(str(tmp_path / "hf"))
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            image_run_config(tiny_llama_dir, {"hf_dataset": str(tmp_path / "hf")}, batch_size=2, max_steps=3)
        )
    )
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "does not hold an image" in capsys.readouterr().err


def test_an_epoch_with_no_usable_batch_stops_instead_of_looping(tmp_path, tiny_llama_dir, capsys):
    """The first rows decode, so the start check passes; the
    files then break (replaced mid-run): an error, not a loop."""
    from semroute.config import load_config
    from semroute.train import train

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "text": "a red square"})
    (tmp_path / "data.json").write_text(json.dumps(rows))
    config = load_config(
        image_run_config(
            tiny_llama_dir,
            {"manifest": str(tmp_path / "data.json")},
            batch_size=2,
            max_steps=50,
            checkpoint_every=100,
        )
    )
    from semroute import sources

    real = sources._check_usable

    def check_then_break(dataset):
        real(dataset)
        for i in range(4):
            (tmp_path / "img" / f"{i}.png").write_bytes(b"")

    sources._check_usable = check_then_break
    try:
        with pytest.raises(ValueError, match="epoch 0 held no usable image .* fix or replace the images"):
            train(config, tmp_path / "run", progress=False)
    finally:
        sources._check_usable = real


# ------------------------------------------------------------------ fuzzing the manifest and image reader

ROW_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
ROWS = st.lists(
    st.dictionaries(st.sampled_from(["image", "text", "other"]), ROW_VALUES, max_size=3), max_size=4
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_fuzzed_manifests_load_or_raise_a_one_line_value_error(tmp_path, rows):
    try:
        data = dataset_of(tmp_path, rows)
    except ValueError as err:
        assert str(err) and "\n" not in str(err)
        return
    for i in range(len(data)):
        assert data[i] is None or data[i][0].shape == (3, R, R)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.binary(max_size=300),
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM"]),
)
def test_fuzzed_image_bytes_decode_or_raise_a_value_error(tmp_path, content, prefix):
    path = tmp_path / "fuzz.img"
    path.write_bytes(prefix + content)
    try:
        image = open_image(path, R, 10**6)
    except ValueError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert to_training_tensor(image, R).shape == (3, R, R)


def test_a_directory_or_fifo_given_as_a_file_is_refused_not_read(tmp_path, capsys):
    import os

    from semroute.bench.public import read_prompts

    os.mkfifo(tmp_path / "prompts.csv")  # reading it would block for ever
    with pytest.raises(ValueError, match="is not a regular file"):
        read_prompts("drawbench", tmp_path / "prompts.csv")
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "is not a regular file; point --config at a YAML file" in capsys.readouterr().err
