"""Text as long as the prompt: padding changes the cost, never the result.

Ragged caches against padded ones built here by hand (the layout of cache version 3), the conversion between
them, sorted-by-length encoding against one prompt at a time, and every strategy's DiT output with and
without padding.
"""

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from semroute.config import load_config
from semroute.data.cache import CACHE_META, CachedDataset, collate_rows, convert_cache
from semroute.features import encode_prompts, encode_ragged
from semroute.fusion import STRATEGIES
from semroute.precompute import plan_cache, precompute

from .test_data import image_run_config
from .test_dit import make

CAPTIONS = [
    "two blue squares and one red circle above a small green triangle",
    "one red circle",
    "a",
    "three green triangles",
    "two red squares left of one blue circle",
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_same_output_padded_or_not(strategy):
    """Each prompt alone (no padding, no mask), in a batch padded to its longest, and padded to 512 with large
    garbage in the padding: the same DiT output to fp32 tolerance, time gates and deep fusion included."""
    model = make(strategy)
    layers, width = model.config.num_text_layers, model.config.text_dim
    g = torch.Generator().manual_seed(3)
    lengths = [3, 7, 1, 5]
    rows = [torch.randn(layers, n, width, generator=g) for n in lengths]
    x, t = torch.randn(len(rows), 3, 8, 8, generator=g), torch.rand(len(rows), generator=g)
    with torch.no_grad():
        alone = torch.cat(
            [
                model(x[i : i + 1], t[i : i + 1], row[:, None], torch.ones(1, row.shape[1], dtype=torch.bool))
                for i, row in enumerate(rows)
            ]
        )
        for length in (max(lengths), 512):
            text = 1e3 * torch.randn(layers, len(rows), length, width, generator=g)
            mask = torch.zeros(len(rows), length, dtype=torch.bool)
            for i, row in enumerate(rows):
                text[:, i, : row.shape[1]], mask[i, : row.shape[1]] = row, True
            torch.testing.assert_close(model(x, t, text, mask), alone, rtol=1e-5, atol=1e-5)
    assert alone.abs().max() > 1e-3  # the outputs are not all zero (adaLN-zero was perturbed)


@pytest.mark.parametrize("kind", ["hidden_states", "keys_values"])
def test_sorted_encoding_equals_one_prompt_at_a_time(kind, tiny_llama_dir):
    from semroute.text_encoder import TextEncoder, TextEncoderConfig

    layers = [2, 3] if kind == "keys_values" else []
    encoder = TextEncoder(
        TextEncoderConfig(model=str(tiny_llama_dir), max_length=16, layers=layers, features=kind)
    )
    counts = encoder.token_counts(CAPTIONS)
    assert counts != sorted(counts)  # the chunks are not in the prompts' order
    rows = encode_ragged(encoder, CAPTIONS, batch_size=2)
    table = encode_prompts(encoder, CAPTIONS, batch_size=2)
    for i, caption in enumerate(CAPTIONS):
        alone, mask = encoder.features([caption])
        assert mask.all() and rows[i].shape[1] == mask.shape[1] == counts[i]
        torch.testing.assert_close(rows[i], alone[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(table.hidden[i][:, : counts[i]], alone[:, 0], rtol=1e-5, atol=1e-5)
        assert table.mask[i].sum() == counts[i] and not table.hidden[i][:, counts[i] :].any()


def write_padded_copy(cache, out, max_length):
    """The same cache in the layout of cache version 3, built from the ragged one by hand: every row padded
    with zeros to max_length, with its mask; the null prompt likewise."""
    shutil.copytree(cache, out)
    meta = json.loads((out / CACHE_META).read_text())
    for entry in meta["shards"]:
        with safe_open(out / entry["file"], "pt") as f:
            latents, tokens, lengths = (f.get_tensor(k) for k in ("latents", "text", "lengths"))
            metadata = f.metadata()
        text = torch.zeros(len(lengths), tokens.shape[1], max_length, tokens.shape[2], dtype=tokens.dtype)
        mask = torch.zeros(len(lengths), max_length, dtype=torch.bool)
        start = 0
        for j, n in enumerate(lengths.tolist()):
            text[j, :, :n], mask[j, :n] = tokens[start : start + n].transpose(0, 1), True
            start += n
        save_file({"latents": latents, "text": text, "mask": mask}, out / entry["file"], metadata=metadata)
        entry.update(bytes=(out / entry["file"]).stat().st_size, sha256=None)
    null = load_file(out / "null.safetensors")["text"]
    text = torch.zeros(null.shape[1], max_length, null.shape[2], dtype=null.dtype)
    text[:, : null.shape[0]] = null.transpose(0, 1)
    mask = torch.arange(max_length) < null.shape[0]
    save_file({"text": text, "mask": mask}, out / "null.safetensors")
    meta.update(null_bytes=(out / "null.safetensors").stat().st_size, null_sha256=None)
    meta["recipe"]["version"] = 3
    (out / CACHE_META).write_text(json.dumps(meta))
    return out


@pytest.fixture
def ragged_cache(tmp_path, tiny_llama_dir, tiny_encoder):
    from .conftest import write_image_folder

    rows = write_image_folder(tmp_path / "data", n=12)
    for i, row in enumerate(rows):
        row["text"] = CAPTIONS[i % len(CAPTIONS)]
    manifest = tmp_path / "data" / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    raw = image_run_config(tiny_llama_dir, {"manifest": str(manifest)}, batch_size=4, max_steps=6)
    raw["train"].update(checkpoint_every=3, warmup_steps=1, caption_dropout=0.3)
    config = load_config(raw)
    meta = precompute(
        config, tmp_path / "cache", shard_size=5, dtype="fp32", progress=False, encoder=tiny_encoder
    )
    return raw, meta, tmp_path / "cache"


def test_a_ragged_cache_stores_real_tokens_and_batches_to_the_longest(ragged_cache, tiny_encoder):
    raw, meta, cache = ragged_cache
    data = CachedDataset(cache)
    counts = tiny_encoder.token_counts(CAPTIONS)
    assert meta["recipe"]["version"] == 4 and [s["rows"] for s in meta["shards"]] == [5, 5, 2]
    assert data.lengths().tolist() == [counts[i % len(CAPTIONS)] for i in range(12)]
    # The shards hold exactly the real tokens: nothing of max_length (16) is stored.
    stored = sum(safe_open(cache / s["file"], "pt").get_slice("text").get_shape()[0] for s in meta["shards"])
    assert stored == sum(data.lengths().tolist()) < 12 * 16
    latents, text, mask = collate_rows([data[1], data[2], data[3]])
    assert text.shape[2] == mask.shape[1] == max(counts[1:4]) and text.is_contiguous()
    assert mask.sum(1).tolist() == counts[1:4] and not text[:, 1, counts[2] :].any()
    null, null_mask = data.null_features()
    alone, m = tiny_encoder.features([""])
    assert null_mask.all() and null.shape[1] == m.shape[1]
    torch.testing.assert_close(null, alone[:, 0])


def test_dry_run_counts_the_bytes_precompute_writes(ragged_cache, tmp_path):
    raw, meta, cache = ragged_cache
    plan = plan_cache(load_config(raw), dtype="fp32", device="cpu")
    written = sum(p.stat().st_size for p in cache.glob("*.safetensors"))
    headers = 4 * 1024  # safetensors' JSON header per file
    assert plan["rows"] == meta["rows"] == 12
    assert plan["bytes"] <= written <= plan["bytes"] + headers
    assert plan["padded_bytes"] > 1.5 * plan["bytes"]
    padded = write_padded_copy(cache, tmp_path / "padded", 16)
    padded_written = sum(p.stat().st_size for p in padded.glob("*.safetensors"))
    assert plan["padded_bytes"] <= padded_written <= plan["padded_bytes"] + headers


def test_dry_run_on_the_command_line_writes_nothing(ragged_cache, tmp_path, capsys):
    from semroute.cli import main

    raw, _, _ = ragged_cache
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "never"
    code = main(["precompute", "--config", str(config), "--out", str(out), "--dry-run", "--dtype", "fp32"])
    assert code == 0 and not out.exists()
    said = capsys.readouterr().out
    assert "12 rows" in said and "Nothing written" in said and "Padded to max_length" in said


def train_on(raw, cache, out, max_steps):
    from semroute.train import train

    raw = {**raw, "dataset": {"cache": str(cache), "resolution": 16}}
    raw["train"] = {**raw["train"], "max_steps": max_steps}
    return train(load_config(raw), out, progress=False)


def test_padded_caches_train_convert_in_place_and_resume_across_the_conversion(ragged_cache, tmp_path):
    raw, _, cache = ragged_cache
    padded = write_padded_copy(cache, tmp_path / "padded", 16)
    ragged_rows, padded_rows = CachedDataset(cache), CachedDataset(padded)
    for i in range(len(ragged_rows)):  # a padded row reads as its real tokens
        for a, b in zip(ragged_rows[i], padded_rows[i], strict=True):
            assert torch.equal(a, b)
    whole = train_on(raw, padded, tmp_path / "whole", 6).model.state_dict()
    # Train 3 steps on the padded cache, convert it in place, resume to 6 on the converted one.
    first = train_on(raw, padded, tmp_path / "resumed", 3)
    assert first.steps == 3
    before = sum(p.stat().st_size for p in padded.glob("*.safetensors"))
    meta = convert_cache(padded, progress=False)
    after = sum(p.stat().st_size for p in padded.glob("*.safetensors"))
    assert meta["recipe"]["version"] == 4 and after < 0.75 * before
    converted = CachedDataset(padded)
    for i in range(len(converted)):
        for a, b in zip(ragged_rows[i], converted[i], strict=True):
            assert torch.equal(a, b)
    resumed = train_on(raw, padded, tmp_path / "resumed", 6)
    assert resumed.steps == 6
    for name, weight in whole.items():
        torch.testing.assert_close(resumed.model.state_dict()[name], weight, rtol=0, atol=0, msg=name)
    # The converted cache is what precompute makes for this config: precompute finds it complete.
    assert precompute(load_config(raw), padded, shard_size=5, dtype="fp32", progress=False)["rows"] == 12


def test_a_conversion_killed_midway_leaves_a_cache_that_loads_and_finishes(
    ragged_cache, tmp_path, monkeypatch
):
    from pathlib import Path

    raw, _, cache = ragged_cache
    padded = write_padded_copy(cache, tmp_path / "padded", 16)
    reference = [CachedDataset(cache)[i] for i in range(12)]
    real_unlink, calls = Path.unlink, []

    def killed_after_the_second_shard(self, *args, **kwargs):
        if not self.name.startswith("."):  # (temporary files are unlinked too)
            calls.append(self.name)
        if len(calls) == 2 and not self.name.startswith(
            "."
        ):  # the second shard's ragged copy is written and named in cache.json: die here
            raise KeyboardInterrupt
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_after_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_cache(padded, progress=False)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    halfway = CachedDataset(padded)  # two layouts side by side, one row set
    assert halfway.meta["recipe"]["version"] == 3
    assert (padded / "shard_00001.safetensors").is_file() and (
        padded / "shard_00001.ragged.safetensors"
    ).is_file()
    for i, row in enumerate(reference):
        assert all(torch.equal(a, b) for a, b in zip(row, halfway[i], strict=True))
    meta = convert_cache(padded, progress=False)
    assert meta["recipe"]["version"] == 4
    assert sorted(p.name for p in padded.glob("*.safetensors")) == sorted(
        [s["file"] for s in meta["shards"]] + [meta["null_file"]]
    )
    done = CachedDataset(padded)
    for i, row in enumerate(reference):
        assert all(torch.equal(a, b) for a, b in zip(row, done[i], strict=True))


def test_precompute_into_a_padded_cache_asks_for_the_conversion(ragged_cache, tmp_path, tiny_encoder):
    raw, _, cache = ragged_cache
    padded = write_padded_copy(cache, tmp_path / "padded", 16)
    with pytest.raises(ValueError, match=f"semroute convert-cache {padded}"):
        precompute(load_config(raw), padded, shard_size=5, dtype="fp32", progress=False, encoder=tiny_encoder)


def test_length_grouped_batches_visit_the_epochs_rows_and_pad_less():
    from semroute.sources import EpochShuffle, LengthGroupedShuffle

    lengths = torch.randint(3, 60, (103,), generator=torch.Generator().manual_seed(0))
    B, n = 8, 103
    plain, grouped = EpochShuffle(n, seed=5), LengthGroupedShuffle(lengths, seed=5, batch_size=B, window=4)
    padded = {}
    for sampler in (plain, grouped):
        sampler.epoch = 2
        order = list(sampler)
        assert sorted(order) == list(range(n)) and order == list(
            sampler
        )  # a permutation, fixed by (seed, epoch)
        batches = [order[i : i + B] for i in range(0, n - n % B, B)]
        padded[sampler] = sum(B * int(lengths[b].max()) for b in batches)
        if sampler is grouped:  # the same rows in full batches as the plain order, the same remainder dropped
            plain_order = list(plain)
            assert set(order[: n - n % B]) == set(plain_order[: n - n % B])
            assert order[n - n % B :] == plain_order[n - n % B :]
    assert padded[grouped] < 0.8 * padded[plain]  # batches of similar lengths pad far less
    grouped.epoch = 3
    assert list(grouped) != order  # another epoch, another order


def test_length_grouping_trains_from_a_cache_and_resumes_exactly(ragged_cache, tmp_path):
    raw, _, cache = ragged_cache
    raw = {**raw, "train": {**raw["train"], "length_grouping": 2}}
    whole = train_on(raw, cache, tmp_path / "whole", 6).model.state_dict()
    train_on(raw, cache, tmp_path / "resumed", 3)
    resumed = train_on(raw, cache, tmp_path / "resumed", 6).model.state_dict()
    for name, weight in whole.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=0, msg=name)
    # Only a cache knows every row's length up front.
    from semroute.train import train

    with pytest.raises(ValueError, match="train.length_grouping groups the rows of a precomputed cache"):
        train(load_config(raw), tmp_path / "images", progress=False)


def test_convert_cache_refuses_what_it_cannot_convert_and_leaves_it_alone(ragged_cache, tmp_path, capsys):
    from semroute.cli import main

    raw, _, cache = ragged_cache
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert main(["convert-cache", str(cache)]) == 0  # already ragged: nothing to do, nothing touched
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["convert-cache", str(plain)]) != 0
    assert "not a semroute cache (no cache.json)" in capsys.readouterr().err
    padded = write_padded_copy(cache, tmp_path / "padded", 16)
    shard = padded / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    files = {p.name: p.read_bytes() for p in padded.iterdir()}
    assert main(["convert-cache", str(padded)]) != 0
    said = capsys.readouterr().err
    assert "truncated or damaged" in said and "nothing was converted" in said
    assert {p.name: p.read_bytes() for p in padded.iterdir()} == files
    with pytest.raises(ValueError, match="train.length_grouping must be >= 0"):
        load_config({**raw, "train": {**raw["train"], "length_grouping": -1}})


def test_shapes_batches_and_caption_dropout_stay_as_long_as_their_prompts(tiny_llama_dir, tiny_encoder):
    from semroute.features import drop_captions
    from semroute.sources import ShapesSource

    from .conftest import tiny_run_config

    source = ShapesSource(
        load_config(tiny_run_config(tiny_llama_dir, batch_size=4)), tiny_encoder, None, False
    )
    null_text, null_mask = source.null
    assert null_mask.all() and null_text.shape[1] == tiny_encoder.token_counts([""])[0]
    table = source.features.mask.sum(1)
    x0, ids = next(iter(source.loader(4)))
    text, mask = source.condition((x0, ids), torch.device("cpu"))[1:]
    assert text.shape[2] == mask.shape[1] == int(table[ids].max()) <= int(table.max())
    dropped, dropped_mask = drop_captions(
        text, mask, null_text, null_mask, torch.tensor([True, False, False, False])
    )
    assert dropped.shape[2] == max(text.shape[2], null_text.shape[1])
    assert dropped_mask[0].sum() == null_text.shape[1]
    torch.testing.assert_close(dropped[:, 0, : null_text.shape[1]], null_text)


def test_a_shard_whose_lengths_do_not_add_up_is_refused_by_name(ragged_cache):
    raw, meta, cache = ragged_cache
    entry = meta["shards"][1]
    shard = cache / entry["file"]
    tensors = load_file(shard)
    tensors["lengths"][0] += 1  # one more token than the shard stores (written again with matching sizes)
    save_file(tensors, shard)
    entry.update(bytes=shard.stat().st_size, sha256=None)
    (cache / CACHE_META).write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"shard_00001.safetensors is inconsistent: its rows' lengths add up to"
    ):
        CachedDataset(cache)
