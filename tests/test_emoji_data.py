"""`semroute data emoji`: a real captioned set from an npm tarball (a tiny one made here), its held-out
split, and training reads of its RGBA images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semroute.data import emoji
from semroute.data.images import DatasetConfig, ImageCaptionDataset

from .test_bad_inputs import assert_answered, run_cli

TONES = ["1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"]
NAMES = (
    ["1f44b"]  # waving hand, and in five skin tones
    + [f"1f44b-{t}" for t in TONES]
    + ["1f977", "1f977-1f3fc", "1f977-1f3ff"]  # ninja in two tones
    + ["1f46e", "1f46e-1f3fb", "1f46e-1f3fd", "1f46e-1f3fe"]  # police officer in three
    + [
        "1f468-200d-1f468-200d-1f467",  # family: man, man, girl
        "1f468-200d-1f469-200d-1f466",  # family: man, woman, boy
        "1f468-200d-1f469-200d-1f467",  # family: man, woman, girl
        "1f469-200d-1f469-200d-1f466",  # family: woman, woman, boy
        "1f468-200d-1f466",  # family: man, boy
        "1f469-200d-1f467",  # family: woman, girl
        "1f468-200d-1f468-200d-1f466",  # family: man, man, boy
        "1f469-200d-1f469-200d-1f467",  # family: woman, woman, girl
    ]
    + ["1f1eb-1f1f7", "1f600", "e0000"]  # flag: France, grinning face, a code point Unicode does not name
)


def webp(colour: tuple[int, int, int]) -> bytes:
    """A 16x16 RGBA WebP: an opaque square in the middle, transparent corners."""
    array = np.zeros((16, 16, 4), dtype=np.uint8)
    array[..., :3] = colour
    array[4:12, 4:12, 3] = 255
    out = io.BytesIO()
    Image.fromarray(array, "RGBA").save(out, format="WEBP", lossless=True)
    return out.getvalue()


def make_tarball(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for i, name in enumerate(names + ["README"]):
            content = webp((40 * (i % 6), 200, 90)) if name != "README" else b"docs"
            member = tarfile.TarInfo(
                f"package/assets/{name}.webp" if name != "README" else "package/README.md"
            )
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_captions_read_as_unicode_names_them():
    def named(codepoints: str):
        return emoji.caption_of([int(c, 16) for c in codepoints.split("-")])

    assert named("1f977-1f3fc") == ("ninja: medium-light skin tone", "ninja", ("medium-light skin tone",))
    assert named("1f468-200d-1f468-200d-1f467")[0] == "family: man, man, girl"
    assert named("1f1eb-1f1f7")[0] == "flag: France"
    assert named("1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3fd")[1:] == (
        "people holding hands",
        ("light skin tone", "medium skin tone"),
    )
    assert named("e0000") is None


def test_data_emoji_writes_a_split_set_that_holds_out_whole_combinations(tmp_path, capsys):
    tarball = make_tarball(tmp_path / "fluent.tgz", NAMES)
    out = tmp_path / "emoji"
    code, _ = run_cli(capsys, ["data", "emoji", "--out", str(out), "--from", str(tarball)])
    assert code == 0
    train, held = read_rows(out / "train.jsonl"), read_rows(out / "heldout.jsonl")
    summary = json.loads((out / "split.json").read_text())
    assert summary["images"] == len(NAMES) - 1 == len(train) + len(held)
    assert summary["unnamed_skipped"] == ["e0000"]
    assert all((out / row["image"]).is_file() for row in train + held)
    # Skin tones: one (person, tone) per multi-tone emoji is held out; the person is seen in another tone and
    # the tone on another person.
    toned_held = [r for r in held if r["tones"]]
    assert {r["base"] for r in toned_held} == {"waving hand", "ninja", "police officer"}
    for row in toned_held:
        assert any(r["base"] == row["base"] and r["tones"] for r in train)
        assert any(r["tones"] == row["tones"] and r["base"] != row["base"] for r in train)
    # Families: some member combinations are held out, and each of their members is seen in training.
    families_held = [r for r in held if r["text"].startswith("family")]
    assert families_held
    trained_members = {
        m for r in train if r["text"].startswith("family: ") for m in r["text"][8:].split(", ")
    }
    for row in families_held:
        assert set(row["text"][8:].split(", ")) <= trained_members
    assert not any(r["text"] in {t["text"] for t in train} for r in held)
    # The split is a function of the names: the same package always splits the same way.
    before = (out / "train.jsonl").read_bytes(), (out / "heldout.jsonl").read_bytes()
    run_cli(capsys, ["data", "emoji", "--out", str(out), "--from", str(tarball)])
    assert ((out / "train.jsonl").read_bytes(), (out / "heldout.jsonl").read_bytes()) == before


def test_the_manifest_trains_on_composited_rgba(tmp_path):
    out = tmp_path / "emoji"
    emoji.build_emoji_set(out, make_tarball(tmp_path / "fluent.tgz", NAMES[:4]))
    config = DatasetConfig(manifest=str(out / "train.jsonl"), resolution=16, background="black")
    x, caption = ImageCaptionDataset(config)[0]
    assert caption in {r["text"] for r in read_rows(out / "train.jsonl")}
    assert torch.equal(x[:, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))  # a transparent corner: the background
    assert x[1, 8, 8] == pytest.approx(200 / 127.5 - 1, abs=0.02)  # the opaque middle: the emoji's green


def test_bad_sources_are_one_line_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "not.tgz").write_bytes(b"plain text")
    code, err = run_cli(
        capsys, ["data", "emoji", "--out", str(tmp_path / "a"), "--from", str(tmp_path / "not.tgz")]
    )
    assert_answered(code, err, "is not a readable gzip tarball of an npm package")
    empty = make_tarball(tmp_path / "empty.tgz", [])
    code, err = run_cli(capsys, ["data", "emoji", "--out", str(tmp_path / "b"), "--from", str(empty)])
    assert_answered(code, err, "holds no named emoji images")
    code, err = run_cli(
        capsys, ["data", "emoji", "--out", str(tmp_path / "c"), "--from", str(tmp_path / "gone")]
    )
    assert_answered(code, err, "does not exist")
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="npm is not installed.*--from"):
        emoji.fetch_package(emoji.FLUENT_PACKAGE, tmp_path / "d")
