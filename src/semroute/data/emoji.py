"""A real image-caption set from the npm registry: Microsoft's Fluent 3D emoji, captioned with their
Unicode (CLDR) names, split so that whole combinations are held out while each part is seen in training.

`semroute data emoji --out DIR` fetches `@lobehub/fluent-emoji-3d` with npm (the registry's ordinary
client, at set-up time; `--from` takes a tarball already on disk, for offline machines) and writes
`DIR/images/*.webp`, `DIR/train.jsonl`, `DIR/heldout.jsonl` and `DIR/split.json`. Images are 256x256 RGBA:
training composites them onto `dataset.background`.

The held-out split (fixed, by the SHA-256 of each name, so the same package always splits the same way):
- skin tones: of every emoji drawn in several skin tones, one (person, tone) combination is held out; the
  person is seen in its other tones and the tone on other people;
- families and couples: one in four member combinations is held out; each member (man, woman, girl, boy)
  is seen in the other families.
Every row records its `base` (the name without skin tones) and `tones`, so captions that differ in one
attribute can be grouped for attribute accuracy.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import emoji as emoji_names

from ..base import one_line
from ..fileio import write_json, write_text

FLUENT_PACKAGE = "@lobehub/fluent-emoji-3d@1.1.0"
SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
FAMILY_WORDS = ("family", "couple", "kiss")
FAMILY_MEMBERS = {"man", "woman", "girl", "boy", "adult", "child"}
FAMILY_HOLDOUT = 4  # one family or couple combination in this many is held out


def fetch_package(spec: str, into: Path) -> Path:
    """`npm pack spec` into `into`: the package's tarball, fetched by the registry's own client."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            "npm is not installed: install it (apt-get install npm) or pass --from with the package's "
            f"tarball (npm pack {spec} on a machine that has npm)"
        )
    into.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(into), "--silent"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise ValueError(f"npm pack {spec} failed: {one_line(done.stderr, 300)}")
    return into / done.stdout.strip().splitlines()[-1]


def caption_of(codepoints: list[int]) -> tuple[str, str, tuple[str, ...]] | None:
    """(caption, base name without skin tones, skin tones) of an emoji sequence, or None if Unicode does not
    name it. Flags read "flag: France"; skin tones follow the name after a colon, as CLDR writes them."""
    text = "".join(chr(c) for c in codepoints)
    data = emoji_names.EMOJI_DATA.get(text) or emoji_names.EMOJI_DATA.get(text.replace("\ufe0f", ""))
    if data is None:
        return None
    name = data["en"].strip(":").replace("_", " ")
    tones = tuple(SKIN_TONES[c] for c in codepoints if c in SKIN_TONES)
    base = name
    for tone in sorted(SKIN_TONES.values(), key=len, reverse=True):  # "medium-light" before "light"
        base = re.sub(rf",? ?{re.escape(tone)}", "", base)
    base = base.strip()
    if all(c in REGIONAL_INDICATORS for c in codepoints):
        return f"flag: {name}", f"flag: {name}", ()
    words = base.split(" ")
    if words[0] == "family" and len(words) > 1 and set(words[1:]) <= FAMILY_MEMBERS:
        base = name = f"family: {', '.join(words[1:])}"  # as CLDR writes it
    caption = f"{base}: {', '.join(tones)}" if tones else name
    return caption, base, tones


def _held_value(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out) by the module's documented rule."""
    by_base: dict[str, list[dict]] = {}
    for row in rows:
        if row["tones"]:
            by_base.setdefault(row["base"], []).append(row)
    held: set[str] = set()
    for base, variants in by_base.items():
        if len(variants) >= 2:
            variants = sorted(variants, key=lambda r: r["codepoints"])
            held.add(variants[_held_value(base) % len(variants)]["codepoints"])
    for row in rows:
        family = row["base"].replace(":", " ").split(" ")[0] in FAMILY_WORDS
        if family and not row["tones"] and _held_value(row["base"]) % FAMILY_HOLDOUT == 0:
            held.add(row["codepoints"])
    train = [r for r in rows if r["codepoints"] not in held]
    return train, [r for r in rows if r["codepoints"] in held]


def _assets(source: Path) -> list[tuple[str, bytes]]:
    """(code points, WebP bytes) of every `package/assets/<code points>.webp` in an npm tarball."""
    found = []
    try:
        with tarfile.open(source, "r:gz") as archive:
            for member in archive.getmembers():
                match = re.fullmatch(r"package/assets/([0-9a-f]+(?:-[0-9a-f]+)*)\.webp", member.name)
                data = archive.extractfile(member) if match and member.isfile() else None
                if match and data is not None:
                    found.append((match.group(1), data.read()))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{source} is not a readable gzip tarball of an npm package ({err})") from None
    return found


def build_emoji_set(out: Path, tarball: Path | None = None) -> dict:
    """Write the captioned, split image set into `out` (from `tarball`, else fetched with npm); returns
    the summary also written to split.json. Re-running over a finished directory only rewrites it."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch.", dir=out) as tmp:
        source = Path(tarball) if tarball is not None else fetch_package(FLUENT_PACKAGE, Path(tmp))
        if not source.is_file():
            raise FileNotFoundError(
                f"{source} does not exist; pass the tarball `npm pack {FLUENT_PACKAGE}` wrote"
            )
        images = out / "images"
        images.mkdir(exist_ok=True)
        rows: list[dict[str, Any]] = []
        unnamed: list[str] = []
        for codepoints, content in _assets(source):
            named = caption_of([int(c, 16) for c in codepoints.split("-")])
            if named is None:
                unnamed.append(codepoints)
                continue
            (images / f"{codepoints}.webp").write_bytes(content)
            caption, base, tones = named
            rows.append(
                {
                    "image": f"images/{codepoints}.webp",
                    "text": caption,
                    "codepoints": codepoints,
                    "base": base,
                    "tones": list(tones),
                }
            )
    if not rows:
        raise ValueError(f"{source} holds no named emoji images (package/assets/<code points>.webp)")
    rows.sort(key=lambda r: r["codepoints"])
    train, held_out = split_rows(rows)
    write_text(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in train))
    write_text(out / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in held_out))
    summary = {
        "package": FLUENT_PACKAGE if tarball is None else str(tarball),
        "images": len(rows),
        "train": len(train),
        "held_out": len(held_out),
        "unnamed_skipped": unnamed,
        "rule": "one (person, skin tone) per multi-tone emoji and one in "
        f"{FAMILY_HOLDOUT} family/couple combinations held out, chosen by sha256 of the name",
    }
    write_json(out / "split.json", summary)
    return summary
