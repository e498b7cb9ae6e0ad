"""Per-layer keys/values for deep fusion (FuseDiT): what the LLM computes, read from its own cache."""

from __future__ import annotations

import pytest
import torch

from semroute.text_encoder import deep_layer_map


def test_layer_keys_values_equal_the_llms_own_attention_inputs(tiny_encoder):
    """Recomputed another way: each decoder layer's input LayerNorm, k/v projections and rotary embedding
    applied to the hidden state entering it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    prompts = ["one red square", "two blue circles and one red square"]
    keys, values, mask = tiny_encoder.layer_keys_values(prompts, [0, 2, 3])
    llm = tiny_encoder.model
    batch = tiny_encoder._tokenize(prompts)
    with torch.no_grad():
        out = llm(**batch, output_hidden_states=True)
        positions = torch.arange(batch["input_ids"].shape[1])[None]
        cos, sin = llm.model.rotary_emb(out.hidden_states[0], positions)
        for d, i in enumerate([0, 2, 3]):
            layer = llm.model.layers[i]
            h = layer.input_layernorm(out.hidden_states[i])  # hidden_states[i] enters decoder layer i
            B, S, _ = h.shape
            head_dim = llm.config.hidden_size // llm.config.num_attention_heads
            k = layer.self_attn.k_proj(h).view(B, S, -1, head_dim).transpose(1, 2)
            v = layer.self_attn.v_proj(h).view(B, S, -1, head_dim).transpose(1, 2)
            q = torch.zeros_like(k)
            _, k = apply_rotary_pos_emb(q, k, cos, sin)
            torch.testing.assert_close(keys[d], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[d], v, rtol=1e-5, atol=1e-5)
    assert keys.shape[:3] == (3, 2, llm.config.num_key_value_heads) and mask.dtype == torch.bool
    assert mask[0].sum() < mask[1].sum()  # the shorter prompt is padded, and its padding is masked
    with pytest.raises(ValueError, match="out of range: the model has layers 0..3"):
        tiny_encoder.layer_keys_values(prompts, [4])


def test_deep_layer_map():
    assert deep_layer_map(30, 6) == [23, 24, 25, 26, 27, 28]  # the 6 layers ending just before the last
    assert deep_layer_map(36, 24, list(range(6, 30))) == list(range(6, 30))  # the paper's pairing
    assert deep_layer_map(30, 2, [-2, -1]) == [28, 29]
    with pytest.raises(ValueError, match="got 3 layers"):
        deep_layer_map(30, 2, [1, 2, 3])
    with pytest.raises(ValueError, match="need as many LLM layers"):
        deep_layer_map(4, 4)


def _attention_block(heads: int = 4, width: int = 32, grid: int = 4):
    from semroute.dit import SelfAttention, rope_2d

    torch.manual_seed(0)
    attn = SelfAttention(width, heads)
    return attn, rope_2d(grid, grid, width // heads)


def test_deep_attention_with_an_empty_prompt_equals_plain_self_attention():
    attn, rope = _attention_block()
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
    attn, rope = _attention_block()
    x = torch.randn(1, 16, 32)
    text_k, text_v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    mask = torch.tensor([[True, True, False]])
    from semroute.dit import apply_rope

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
