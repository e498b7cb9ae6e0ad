import pytest
import torch
import torch.nn.functional as F

from semroute.blocks import _RMSNormFunction, apply_rope, rope_2d
from semroute.dit import DIT_PRESETS, SemanticRoutingDiT
from semroute.fusion import STRATEGIES

L, C = 5, 24


# Deep fusion reads one entry per block (tiny: 2) of keys/values: 2 LLM key/value heads of the DiT's head size
# 16.
DEEP_TEXT = dict(text_dim=2 * 2 * 16, num_text_layers=2, text_kv_heads=2)


def make(strategy="depth", **overrides):
    torch.manual_seed(0)
    text = DEEP_TEXT if strategy == "deep" else dict(text_dim=C, num_text_layers=L)
    model = SemanticRoutingDiT(**{**DIT_PRESETS["tiny"], **overrides}, **text, strategy=strategy)
    # adaLN-zero starts every output at zero; perturb so outputs depend on the inputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(batch=2, seq=6, seed=0, model=None):
    """x, t, text features and mask; the text of `model`'s shape (default: L layers of width C)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    layers, width = (model.config.num_text_layers, model.config.text_dim) if model is not None else (L, C)
    text = torch.randn(layers, batch, seq, width, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, 4:] = False
    return x, t, text, mask


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_output_shape_and_determinism(strategy):
    model = make(strategy)
    x, t, text, mask = inputs(model=model)
    out = model(x, t, text, mask)
    assert out.shape == x.shape
    torch.testing.assert_close(out, model(x, t, text, mask), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_and_reload_is_identical(strategy, tmp_path):
    model = make(strategy)
    model.save_pretrained(tmp_path)
    reloaded = SemanticRoutingDiT.from_pretrained(tmp_path).eval()
    assert reloaded.config.strategy == strategy
    assert (reloaded.config.num_text_layers, reloaded.config.text_dim) == (
        model.config.num_text_layers,
        model.config.text_dim,
    )
    x, t, text, mask = inputs(model=model)
    torch.testing.assert_close(model(x, t, text, mask), reloaded(x, t, text, mask), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["single", "uniform", "static", "depth"])
def test_precomputed_context_equals_recomputed(strategy):
    model = make(strategy)
    x, t, text, mask = inputs()
    context = model.route_text(text, mask)
    torch.testing.assert_close(model(x, t, context=context), model(x, t, text, mask), rtol=0, atol=0)
    # The same context serves any other time step as well.
    t2 = torch.rand(2)
    torch.testing.assert_close(model(x, t2, context=context), model(x, t2, text, mask), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["time", "joint"])
def test_time_dependent_strategies_refuse_a_reused_context(strategy):
    model = make(strategy)
    x, t, text, mask = inputs()
    with pytest.raises(ValueError, match="depends on t"):
        model(x, t, context=model.route_text(text, mask, t))


def test_padding_tokens_are_ignored():
    model = make("depth")
    x, t, text, mask = inputs()
    changed = text.clone()
    changed[:, 1, 4:] = 1e3 * torch.randn_like(changed[:, 1, 4:])
    out, out_changed = model(x, t, text, mask), model(x, t, changed, mask)
    torch.testing.assert_close(out[1], out_changed[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], out_changed[0], rtol=0, atol=0)


def test_text_changes_the_output():
    model = make("depth")
    x, t, text, mask = inputs()
    assert not torch.allclose(model(x, t, text, mask), model(x, t, text.flip(2), mask))


def test_adaln_zero_starts_at_zero_velocity():
    model = SemanticRoutingDiT(**DIT_PRESETS["tiny"], text_dim=C, num_text_layers=L)
    x, t, text, mask = inputs()
    assert model(x, t, text, mask).abs().max() == 0


def test_no_timestep_conditioning_has_no_time_embedding():
    model = make("depth", timestep_conditioning="none")
    assert model.t_embedder is None
    x, t, text, mask = inputs()
    torch.testing.assert_close(model(x, t, text, mask), model(x, torch.rand(2), text, mask), rtol=0, atol=0)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_2d(4, 4, 8)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    rot_q = apply_rope(q.expand(1, 1, 16, 8), cos, sin)[0, 0]
    rot_k = apply_rope(k.expand(1, 1, 16, 8), cos, sin)[0, 0]
    score = rot_q @ rot_k.T  # (16, 16); token index = 4 * row + col

    def s(a, b):
        return score[4 * a[0] + a[1], 4 * b[0] + b[1]]

    torch.testing.assert_close(s((0, 0), (1, 2)), s((2, 1), (3, 3)))
    torch.testing.assert_close(s((1, 1), (1, 1)), s((3, 2), (3, 2)))
    assert not torch.allclose(s((0, 0), (1, 2)), s((0, 0), (2, 1)))


def test_rmsnorm_function_matches_torch_and_its_gradient_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.double, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(_RMSNormFunction.apply(x, w, 1e-6), F.rms_norm(x, (8,), w, 1e-6))
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6), (x, w))


def test_invalid_sizes_are_errors():
    with pytest.raises(ValueError, match="not divisible by model.patch_size"):
        SemanticRoutingDiT(sample_size=9, patch_size=2)
    with pytest.raises(ValueError, match="timestep_conditioning"):
        SemanticRoutingDiT(**{**DIT_PRESETS["tiny"], "timestep_conditioning": "film"})


def test_paper_preset_size():
    with torch.device("meta"):
        model = SemanticRoutingDiT(
            **DIT_PRESETS["paper"], text_dim=2560, num_text_layers=36, strategy="depth"
        )
    assert len(model.blocks) == 24 and model.config.hidden_size == 2048
    assert model.fusion.logits.shape == (24, 36)
