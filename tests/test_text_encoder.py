import logging
from pathlib import Path

import pytest
import torch

from semroute.fusion import LayerFusion
from semroute.text_encoder import TextEncoder, TextEncoderConfig


def test_shapes_and_mask(tiny_encoder):
    hidden, mask = tiny_encoder(["two red circles", "one blue square and three red circles", ""])
    assert tiny_encoder.num_layers == 4 and tiny_encoder.hidden_size == 32
    assert hidden.shape[:2] == (4, 3) and hidden.shape[3] == 32
    assert mask.shape == hidden.shape[1:3] and mask.dtype == torch.bool
    lengths = mask.sum(1)
    assert lengths[1] > lengths[0] > lengths[2] > 0  # the empty prompt still encodes the template


def test_layers_match_the_models_hidden_states(tiny_encoder):
    prompts = ["three red circles"]
    hidden, _ = tiny_encoder(prompts)
    batch = tiny_encoder.tokenizer(
        [tiny_encoder.wrap(p) for p in prompts], add_special_tokens=False, return_tensors="pt"
    )
    with torch.no_grad():
        states = tiny_encoder.model(**batch, output_hidden_states=True).hidden_states
    assert len(states) == 5  # embedding + 4 layers; the embedding output is excluded
    for i in range(4):
        torch.testing.assert_close(hidden[i], states[i + 1])


def test_layer_selection(tiny_llama_dir):
    enc = TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), layers=[-1, 2]))
    assert enc.layers == [4, 2]
    with pytest.raises(ValueError, match="out of range"):
        TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), layers=[5]))


def test_truncation_warns_with_the_limit(tiny_llama_dir, caplog):
    enc = TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), max_length=8))
    with caplog.at_level(logging.WARNING):
        hidden, mask = enc(["one red circle and two blue squares and three green triangles"])
    assert hidden.shape[2] == 8
    assert "max_length=8" in caplog.text


def test_count_word_is_not_at_position_zero(tiny_encoder):
    ids = tiny_encoder.tokenizer(tiny_encoder.wrap("two red circles"), add_special_tokens=False)["input_ids"]
    assert ids[0] != tiny_encoder.tokenizer.convert_tokens_to_ids("two")
    assert tiny_encoder.tokenizer.convert_tokens_to_ids("two") in ids


def test_template_validation(tiny_llama_dir):
    with pytest.raises(ValueError, match="position 0"):
        TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), template="{prompt}, an image"))
    with pytest.raises(ValueError, match="contain"):
        TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), template="an image"))
    enc = TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), template="an image of {prompt}"))
    assert enc.wrap("one red circle") == "an image of one red circle"


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(TextEncoderConfig(model=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder(TextEncoderConfig(model=str(tmp_path / "model.gguf")))


@pytest.mark.slow
def test_embedded_smollm2_gives_30_layers_of_576_and_separates_counts():
    enc = TextEncoder()
    assert enc.num_layers == 30 and enc.hidden_size == 576
    counts = ["two", "three", "four"]
    hidden, mask = enc([f"{c} red circles" for c in counts] + ["a blue square"])
    assert hidden.shape[0] == 30 and hidden.shape[3] == 576
    normed = LayerFusion.normalize(hidden)
    assert not torch.allclose(normed[:, 0], normed[:, 3])
    # Locate the count word in each prompt and compare its LayerNorm'd features in every layer.
    positions = []
    for c in counts:
        ids = enc.tokenizer(enc.wrap(f"{c} red circles"), add_special_tokens=False)["input_ids"]
        word = enc.tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1]
        plain = enc.tokenizer(c, add_special_tokens=False)["input_ids"][-1]
        positions.append(next(i for i, t in enumerate(ids) if t in (word, plain)))
    assert min(positions) > 0
    feats = torch.stack([normed[:, i, p] for i, p in enumerate(positions)], dim=1)  # (30, 3, 576)
    cos = torch.nn.functional.cosine_similarity(feats[:, :, None], feats[:, None, :], dim=-1)  # (30, 3, 3)
    off_diagonal = cos[:, ~torch.eye(3, dtype=torch.bool)]
    # Measured: at most 0.974 in any layer with the chat template.
    assert off_diagonal.max() < 0.985, off_diagonal.max(dim=1).values
    # The failure this guards against: with the count word at position 0 the features coincide.
    raw = enc.tokenizer([f"{c} red circles" for c in counts], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        states = enc.model(**raw, output_hidden_states=True).hidden_states[1:]
    first = LayerFusion.normalize(torch.stack(states)[:, :, 0])  # (30, 3, 576)
    cos_first = torch.nn.functional.cosine_similarity(first[:, :, None], first[:, None, :], dim=-1)
    assert cos_first[:, ~torch.eye(3, dtype=torch.bool)].max() > 0.999


def test_gemma3_270m_is_joined_from_its_package_into_the_cache_then_converted(tmp_path, monkeypatch):
    import sys
    import types

    import semroute.text_encoder as te

    joined = []

    def assemble(target, overwrite=False):
        joined.append((Path(target), overwrite))
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(b"gguf")
        return Path(target)

    converted = []

    def convert(gguf_file, out_dir):
        converted.append((gguf_file, out_dir))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setenv("SEMROUTE_CACHE", str(tmp_path))
    monkeypatch.setattr(te, "convert_gguf", convert)
    monkeypatch.setitem(sys.modules, te.GEMMA_PACKAGE, None)  # not installed
    with pytest.raises(FileNotFoundError, match=r"pip install 'semroute\[gemma\]'"):
        te.resolve_model_dir("gemma3-270m")
    package = types.SimpleNamespace(MODEL_NAME="gemma-3-270m-q4_k_m.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, te.GEMMA_PACKAGE, package)
    assert te.resolve_model_dir("gemma3-270m") == tmp_path / "gemma3-270m"
    assert joined == [(tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf", False)]
    assert converted == [(tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf", tmp_path / "gemma3-270m")]
    assert te.resolve_model_dir("gemma3-270m") == tmp_path / "gemma3-270m" and len(converted) == 1  # cached
