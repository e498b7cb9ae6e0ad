"""Deep fusion (FuseDiT, the paper's seventh row): the LLM's own per-layer keys/values, read from its cache,
attended over by the DiT's image queries; computed once per prompt and cached like hidden states."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from semroute.blocks import SelfAttention, apply_rope, rope_2d
from semroute.config import load_config
from semroute.dit import DIT_PRESETS, SemanticRoutingDiT, check_deep_layout
from semroute.features import dit_text_args, encode_prompts
from semroute.fusion import pack_keys_values, unpack_keys_values
from semroute.pipeline import SemanticRoutingPipeline
from semroute.text_encoder import TextEncoder, TextEncoderConfig, default_deep_layers

from .conftest import tiny_run_config

PROMPTS = ["one red square", "two blue circles and one red square"]


def _deep_encoder(llm_dir, layers=(2, 3), **config) -> TextEncoder:
    return TextEncoder(
        TextEncoderConfig(
            model=str(llm_dir), max_length=16, layers=list(layers), features="keys_values", **config
        )
    )


def _recomputed_keys_values(encoder: TextEncoder, prompts: list[str], layer: int):
    """Decoder layer `layer` (0-based)'s keys/values recomputed from the hidden state entering it: its input
    norm, k/v projections, k-norm where the family has one (Qwen3), and the rotary embedding."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    llm = encoder.model
    batch = encoder._tokenize(prompts)
    with torch.no_grad():
        out = llm(**batch, output_hidden_states=True)
        positions = torch.arange(batch["input_ids"].shape[1])[None]
        layer_types = getattr(llm.config, "layer_types", None)
        if layer_types and "sliding_attention" in layer_types:  # Gemma 3: a rotary base per layer type
            cos, sin = llm.model.rotary_emb(out.hidden_states[0], positions, layer_types[layer])
        else:
            cos, sin = llm.model.rotary_emb(out.hidden_states[0], positions)
        block = llm.model.layers[layer]
        h = block.input_layernorm(out.hidden_states[layer])  # hidden_states[i] enters decoder layer i
        B, S, _ = h.shape
        k = block.self_attn.k_proj(h).view(B, S, -1, encoder.head_dim)
        v = block.self_attn.v_proj(h).view(B, S, -1, encoder.head_dim).transpose(1, 2)
        if hasattr(block.self_attn, "k_norm"):
            k = block.self_attn.k_norm(k)
        _, k = apply_rotary_pos_emb(torch.zeros_like(k.transpose(1, 2)), k.transpose(1, 2), cos, sin)
    return k, v


def test_layer_keys_values_equal_the_llms_own_attention_inputs(tiny_encoder):
    keys, values, mask = tiny_encoder.layer_keys_values(PROMPTS, [0, 2, 3])
    for d, i in enumerate([0, 2, 3]):
        k, v = _recomputed_keys_values(tiny_encoder, PROMPTS, i)
        torch.testing.assert_close(keys[d], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values[d], v, rtol=1e-5, atol=1e-5)
    assert (
        keys.shape[:3] == (3, 2, tiny_encoder.model.config.num_key_value_heads) and mask.dtype == torch.bool
    )
    assert mask[0].sum() < mask[1].sum()  # the shorter prompt is padded, and its padding is masked
    with pytest.raises(ValueError, match="out of range: the model has layers 0..3"):
        tiny_encoder.layer_keys_values(PROMPTS, [4])


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tiny_llama_dir, tmp_path_factory):
    """A random Qwen3 (per-head q/k RMSNorm, explicit head_dim) with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    directory = tmp_path_factory.mktemp("tiny_qwen3")
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # the k-norm weights start at one: make them matter
        for layer in model.model.layers:
            layer.self_attn.k_norm.weight.uniform_(0.5, 2.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_gemma3(tiny_llama_dir, directory, sliding_window: int = 64):
    """A random Gemma 3 text model shaped like Gemma 3 270M in miniature: one key/value head, q/k norms,
    sliding-window and full-attention layers with their own rotary bases."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(2)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_norm.weight.uniform_(-0.5, 1.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tiny_llama_dir, tmp_path_factory):
    return make_tiny_gemma3(tiny_llama_dir, tmp_path_factory.mktemp("tiny_gemma3"))


def test_a_sliding_window_layer_that_lost_the_prompts_start_is_refused(tiny_llama_dir, tmp_path):
    encoder = _deep_encoder(make_tiny_gemma3(tiny_llama_dir, tmp_path / "g", sliding_window=3), layers=[1, 2])
    with pytest.raises(ValueError, match=r"decoder layers \[0\] keep only the last 2 of these .*window 3"):
        encoder.features(PROMPTS)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_the_keys_values_the_dit_receives_are_the_llms_own(
    family, tiny_llama_dir, tiny_qwen3_dir, tiny_gemma3_dir, monkeypatch
):
    """Text features -> DiT: what every block's attention
    gets equals the paired layer's recomputed keys/values."""
    directory = {"llama": tiny_llama_dir, "qwen3": tiny_qwen3_dir, "gemma3": tiny_gemma3_dir}[family]
    encoder = _deep_encoder(directory, layers=[-3, -2])  # 1-based decoder layers, negatives from the end
    n = encoder.num_model_layers
    assert encoder.layers == [n - 2, n - 1]
    features, mask = encoder.features(PROMPTS)
    kv_width = encoder.kv_heads * encoder.head_dim
    assert features.shape[0] == 2 and features.shape[-1] == encoder.feature_dim == 2 * kv_width
    model = SemanticRoutingDiT(
        **{**DIT_PRESETS["tiny"], "hidden_size": 8 * encoder.kv_heads, "num_heads": encoder.kv_heads},
        strategy="deep",
        **dit_text_args(encoder),
    )
    seen = []
    attention_forward = type(model.blocks[0].attn).forward

    def spy(self, x, rope, text_kv=None, text_mask=None):
        seen.append((text_kv, text_mask))
        return attention_forward(self, x, rope, text_kv, text_mask)

    monkeypatch.setattr(type(model.blocks[0].attn), "forward", spy)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), torch.rand(2), features, mask)
    assert len(seen) == 2
    for block, layer in enumerate(encoder.layers):
        k, v = _recomputed_keys_values(encoder, PROMPTS, layer - 1)
        torch.testing.assert_close(seen[block][0][0], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[block][0][1], v, rtol=1e-5, atol=1e-5)
        # The DiT makes the attention mask once: the text tokens' mask, then every image token (never padded).
        formed = seen[block][1]
        keep = formed if formed.dtype == torch.bool else formed == 0
        S = mask.shape[1]
        assert torch.equal(keep[:, 0, 0, :S], mask) and keep[:, 0, 0, S:].all()


def test_pack_and_unpack_are_inverse():
    keys, values = torch.randn(3, 2, 4, 5, 8), torch.randn(3, 2, 4, 5, 8)
    packed = pack_keys_values(keys, values)
    assert packed.shape == (3, 2, 5, 64)
    for d, (k, v) in enumerate(unpack_keys_values(packed, 4)):
        assert torch.equal(k, keys[d]) and torch.equal(v, values[d])


def test_default_pairing_and_the_config_that_follows_the_strategy(tiny_llama_dir):
    assert default_deep_layers(6) == [-7, -6, -5, -4, -3, -2]  # SmolLM2 (30 layers): decoder layers 24..29
    raw = tiny_run_config(tiny_llama_dir, "fusedit")
    raw["model"]["num_heads"] = 4
    config = load_config(raw)
    assert config.model.strategy == "deep"
    assert config.text_encoder.features == "keys_values" and config.text_encoder.layers == [-3, -2]
    assert load_config(tiny_run_config(tiny_llama_dir, "depth")).text_encoder.features == "hidden_states"
    raw["text_encoder"]["layers"] = [1, 2, 3]
    with pytest.raises(
        ValueError, match="pairs each of the 2 DiT blocks with one LLM layer, but text_encoder.layers names 3"
    ):
        load_config(raw)
    raw["text_encoder"].update(layers=[], features="hidden_states")
    with pytest.raises(ValueError, match="does not fit model.strategy 'deep', which reads keys_values"):
        load_config(raw)
    raw["text_encoder"]["features"] = "attention"
    with pytest.raises(ValueError, match="text_encoder.features must be one of hidden_states, keys_values"):
        load_config(raw)


def test_a_head_layout_that_cannot_match_the_llms_names_both(tiny_encoder, tiny_llama_dir):
    encoder = _deep_encoder(tiny_llama_dir)  # 2 key/value heads of size 8
    with pytest.raises(
        ValueError,
        match="the LLM's attention has 2 key/value heads of size 8, this DiT has 2 heads of "
        "size 16; set model.num_heads to a multiple of 2 and model.hidden_size to 8 x "
        "num_heads",
    ):
        SemanticRoutingDiT(**DIT_PRESETS["tiny"], strategy="deep", **dit_text_args(encoder))
    with pytest.raises(ValueError, match="this DiT has 3 heads of size 8"):
        SemanticRoutingDiT(
            **{**DIT_PRESETS["tiny"], "hidden_size": 24, "num_heads": 3},
            strategy="deep",
            **dit_text_args(encoder),
        )
    with pytest.raises(ValueError, match="needs the LLM's key/value head count"):
        SemanticRoutingDiT(**DIT_PRESETS["tiny"], strategy="deep", text_dim=32, num_text_layers=2)
    raw = tiny_run_config(tiny_llama_dir, "deep")  # the tiny preset's 2 heads of 16 do not fit
    from semroute.train import train

    with pytest.raises(ValueError, match="2 key/value heads of size 8, this DiT has 2 heads of size 16"):
        train(load_config(raw), tiny_llama_dir.parent / "never", progress=False)


def test_the_embedded_llms_layout_fits_the_cpu_presets():
    """SmolLM2-135M: 9 query heads over 3 key/value heads of
    size 64 (its config, read without loading weights)."""
    kv_heads, head_dim = 3, 64
    for preset in ("cpu-small", "cpu-small-tfree"):
        p = DIT_PRESETS[preset]
        check_deep_layout(p["hidden_size"], p["num_heads"], 2 * kv_heads * head_dim, kv_heads)
    with pytest.raises(ValueError, match="set model.num_heads to a multiple of 3"):
        check_deep_layout(256, 4, 2 * kv_heads * head_dim, kv_heads)


@pytest.fixture(scope="module")
def deep_run(tiny_llama_dir, tmp_path_factory):
    from semroute.train import train

    raw = tiny_run_config(tiny_llama_dir, "fusedit")
    raw["model"]["num_heads"] = 4
    config = load_config(raw)
    out = tmp_path_factory.mktemp("deep") / "run"
    return config, train(config, out, progress=False)


def test_training_deep_fusion_lowers_the_loss_and_has_no_cross_attention(deep_run):
    config, result = deep_run
    losses = [
        json.loads(line)["loss"]
        for line in (result.checkpoint.parent.parent / "log.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert losses[-1] < losses[0]
    model = result.model
    assert model.context_embedder is None and all(block.cross_attn is None for block in model.blocks)
    plain = SemanticRoutingDiT(
        **{**config.model.dit_kwargs(), "strategy": "depth"}, text_dim=32, num_text_layers=4
    )
    text_side = [*plain.context_embedder.parameters(), *plain.fusion.parameters()]
    text_side += [p for b in plain.blocks for p in (*b.cross_attn.parameters(), *b.norm2.parameters())]
    cross = sum(p.numel() for p in text_side)
    assert sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in model.parameters()) == cross
    saved = json.loads((result.checkpoint / "text_encoder.json").read_text())
    assert saved["features"] == "keys_values" and saved["resolved_layers"] == [2, 3]


def test_keys_values_once_per_prompt_give_the_images_of_recomputing_them_every_step(deep_run, monkeypatch):
    """Against a sampler that runs the LLM for its keys/values
    at every step and for both guidance branches."""
    from semroute.flow import RectifiedFlow

    _, result = deep_run
    pipe = SemanticRoutingPipeline.from_checkpoint(result.checkpoint, precision="fp32")
    calls = []
    llm_forward = pipe.encoder.model.forward
    monkeypatch.setattr(
        pipe.encoder.model, "forward", lambda *a, **k: calls.append(1) or llm_forward(*a, **k)
    )
    once = pipe.generate(PROMPTS, num_inference_steps=4, guidance_scale=3.0, seed=[3, 4])
    # The prompts and the null prompt in one batch, once for every step and both branches
    assert len(calls) == 1

    model, encoder, steps = pipe.transformer, pipe.encoder, 0

    def velocity(x, t):
        nonlocal steps
        steps += 1
        # Recomputed every step
        text, mask = encoder.features(PROMPTS + PROMPTS if x.shape[0] == 4 else PROMPTS)
        null, null_mask = encoder.features([""])
        length = max(text.shape[2], null.shape[2])

        def pad(h, m):
            return (
                torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[2])),
                torch.nn.functional.pad(m, (0, length - m.shape[1])),
            )

        text, mask = pad(text, mask)
        null, null_mask = pad(null, null_mask)
        text = torch.cat([text[:, :2], null.expand(-1, 2, -1, -1)], dim=1)
        mask = torch.cat([mask[:2], null_mask.expand(2, -1)])
        return model(x, t, text, mask)

    noise = torch.stack([torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    every = RectifiedFlow.sample(velocity, noise, pipe.scheduler, 4, 3.0)
    assert steps == 4 and len(calls) > 4
    torch.testing.assert_close(once, ((every + 1) / 2).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_deep_checkpoint_and_export_round_trip(deep_run, tmp_path):
    _, result = deep_run
    pipe = SemanticRoutingPipeline.from_checkpoint(result.checkpoint, precision="fp32")
    images = pipe.generate(PROMPTS, num_inference_steps=3, guidance_scale=2.0, seed=1)
    pipe.save_pretrained(tmp_path / "export")
    again = SemanticRoutingPipeline.from_pretrained(tmp_path / "export")
    again.precision = "fp32"
    assert again.encoder.feature_kind == "keys_values" and again.encoder.layers == [2, 3]
    torch.testing.assert_close(
        again.generate(PROMPTS, num_inference_steps=3, guidance_scale=2.0, seed=1), images, rtol=0, atol=0
    )
    # The exported text encoder read the other way is refused, naming both kinds.
    from semroute.pipeline import check_compatible

    hidden = TextEncoder(
        TextEncoderConfig(model=again.encoder.config.model, layers=[2, 3], max_length=16),
        model=again.encoder.model,
        tokenizer=again.encoder.tokenizer,
    )
    with pytest.raises(
        ValueError, match="reads the LLM's keys_values but the text encoder gives hidden_states"
    ):
        check_compatible(again.transformer, hidden)


def test_deep_attention_with_an_empty_prompt_equals_plain_self_attention():
    torch.manual_seed(0)
    attn, rope = SelfAttention(32, 4), rope_2d(4, 4, 8)
    x = torch.randn(2, 16, 32)
    text_k, text_v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)  # 2 LLM key/value heads of size 8
    with torch.no_grad():
        plain = attn(x, rope)
        masked = attn(x, rope, (text_k, text_v), torch.zeros(2, 5, dtype=torch.bool))
        read = attn(x, rope, (text_k, text_v), torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(read, plain)


def test_deep_attention_groups_query_heads_over_the_llms_key_value_heads():
    """Against an explicit softmax over [text; image] keys, each LLM head serving two query heads."""
    torch.manual_seed(0)
    attn, rope = SelfAttention(32, 4), rope_2d(4, 4, 8)
    x = torch.randn(1, 16, 32)
    text_k, text_v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    mask = torch.tensor([[True, True, False]])
    with torch.no_grad():
        got = attn(x, rope, (text_k, text_v), mask)
        q, k, v = attn.qkv(x).view(1, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(attn.q_norm(q), *rope), apply_rope(attn.k_norm(k), *rope)
        heads = []
        for h in range(4):
            keys = torch.cat([text_k[0, h // 2, :2], k[0, h]])  # the masked text token left out
            values = torch.cat([text_v[0, h // 2, :2], v[0, h]])
            weights = torch.softmax(q[0, h] @ keys.T / 8**0.5, dim=-1)
            heads.append(weights @ values)
        expected = attn.out(torch.stack(heads, 1).reshape(1, 16, 32))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="have 3 heads of size 8; this DiT has 4 query heads of size 8"):
        attn(x, rope, (torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)), torch.ones(1, 3, dtype=torch.bool))


def test_deep_features_are_cached_with_their_recipe_and_not_mixed(
    tmp_path, tiny_llama_dir, tiny_encoder, manifest
):
    """precompute stores each row's packed keys/values; a hidden-state cache is refused for deep training."""
    from semroute.data.cache import CachedDataset
    from semroute.data.images import ImageCaptionDataset
    from semroute.precompute import precompute
    from semroute.train import train

    from .test_data import image_run_config

    raw = image_run_config(tiny_llama_dir, {"manifest": str(manifest)})
    raw["model"].update(strategy="deep", num_heads=4)
    config = load_config(raw)
    deep = TextEncoder(config.text_encoder)
    with pytest.raises(
        ValueError, match="reads the LLM's keys_values, but the text encoder given reads hidden_states"
    ):
        precompute(config, tmp_path / "wrong", progress=False, encoder=tiny_encoder, dtype="fp32")
    meta = precompute(config, tmp_path / "cache", shard_size=4, dtype="fp32", progress=False, encoder=deep)
    assert meta["recipe"]["text_features"] == "keys_values" and meta["recipe"]["text_kv_heads"] == 2
    _, text = CachedDataset(tmp_path / "cache")[1]
    caption = ImageCaptionDataset(config.dataset).captions_of(1)[0]
    direct, m = deep.features([caption])
    assert m.all() and text.shape[1] == m.shape[1]  # the caption's own tokens, no padding
    torch.testing.assert_close(text, direct[:, 0])
    # A hidden-state cache of the same data is refused for deep training, and the other way round.
    plain = copy.deepcopy(raw)
    plain["model"]["strategy"] = "depth"
    precompute(
        load_config(plain),
        tmp_path / "hidden",
        shard_size=4,
        dtype="fp32",
        progress=False,
        encoder=tiny_encoder,
    )
    for cache, strategy in ((tmp_path / "hidden", "deep"), (tmp_path / "cache", "depth")):
        wrong = copy.deepcopy(raw)
        wrong["model"]["strategy"] = strategy
        wrong["dataset"] = {"cache": str(cache), "resolution": 16}
        with pytest.raises(
            ValueError, match="was made another way than this run: .*text_features: cache has"
        ):
            train(load_config(wrong), tmp_path / f"run-{strategy}", progress=False)
    ok = copy.deepcopy(raw)
    ok["dataset"] = {"cache": str(tmp_path / "cache"), "resolution": 16}
    ok["train"].update(max_steps=2, batch_size=4)
    assert train(load_config(ok), tmp_path / "run-deep", progress=False).steps == 2


def test_encode_prompts_reads_what_the_encoder_is_configured_for(tiny_llama_dir):
    encoder = _deep_encoder(tiny_llama_dir)
    table = encode_prompts(encoder, PROMPTS)
    keys, values, mask = encoder.layer_keys_values(PROMPTS, [1, 2])
    n = keys.shape[3]
    assert not mask.all()  # the prompts differ in length
    # Real tokens hold the LLM's keys/values; padding holds zeros (the table stores no pad token's keys).
    packed = pack_keys_values(keys, values) * mask[None, :, :, None]
    assert torch.equal(table.mask, mask)
    torch.testing.assert_close(table.hidden[:, :, :n].transpose(0, 1), packed)
