import math

import numpy as np
import pytest
import torch

from semroute.fusion import PAPER_IDS, STRATEGIES, LayerFusion, check_strategy

L, D, B, S, C = 7, 3, 2, 5, 16
LEARNED = ("static", "time", "depth", "joint")


def hidden(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Large offsets and scales per layer, like the massive activations of real LLMs.
    return torch.randn(L, B, S, C, generator=g) * torch.logspace(0, 3, L).view(L, 1, 1, 1) + 50.0


def reference_layer_norm(h: np.ndarray) -> np.ndarray:
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_are_convex_and_learned_ones_start_uniform(strategy):
    if strategy == "deep":  # a fixed pairing of block d with entry d: the identity, never learned
        fusion = LayerFusion(D, D, strategy)
        torch.testing.assert_close(fusion.layer_weights(), torch.eye(D))
        assert fusion.weight_entropy().item() == 0 and not list(fusion.parameters())
        features = hidden()[:D]
        assert fusion(features) is features  # keys/values are used as they are: never normalized, never mixed
        return
    fusion = LayerFusion(L, D, strategy, text_dim=C)
    t = torch.rand(B)
    w = fusion.layer_weights(t if fusion.depends_on_t else None)
    assert w.shape == ((B, D, L) if fusion.depends_on_t else (D, L))
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert (w >= 0).all()
    if strategy == "hard":  # block d reads the layer at its relative depth: 3 blocks over 7 layers
        assert w.argmax(-1).tolist() == [1, 4, 6] and w.max(-1).values.eq(1).all()
    elif strategy == "concat":  # what it reads: the taps at 1/4, 1/2, 3/4 of the depth (stacked, not mixed)
        torch.testing.assert_close(w[:, [1, 3, 4]], torch.full((D, 3), 1 / 3))
    elif strategy != "single":
        torch.testing.assert_close(w, torch.full_like(w, 1 / L))
        assert fusion.weight_entropy().item() == pytest.approx(math.log(L), abs=1e-5)


@pytest.mark.parametrize("layer", [0, 3, -1, -2])
def test_single_equals_layernormed_chosen_layer(layer):
    h = hidden()
    fused = LayerFusion(L, D, "single", single_layer=layer)(h)
    assert fused.shape == (1, B, S, C)
    expected = reference_layer_norm(h[layer].double().numpy())
    np.testing.assert_allclose(fused[0].double().numpy(), expected, atol=1e-4)


def test_single_defaults_to_the_penultimate_layer():
    fusion = LayerFusion(L, D, "single")
    assert fusion.layer_weights()[0].argmax().item() == L - 2


@pytest.mark.parametrize("strategy", ["static", "depth", "time", "joint"])
def test_fusion_matches_independent_reference(strategy):
    torch.manual_seed(1)
    fusion = LayerFusion(L, D, strategy)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_()  # move away from uniform so the weights matter
    h, t = hidden(), torch.rand(B)
    fused = fusion(h, t).detach().double().numpy()  # (G, B, S, C)
    logits = fusion.group_logits(t).detach().double().numpy()
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    normed = reference_layer_norm(h.double().numpy())  # (L, B, S, C)
    if weights.ndim == 2:  # (G, L)
        expected = np.einsum("gl,lbsc->gbsc", weights, normed)
    else:  # (B, G, L)
        expected = np.einsum("bgl,lbsc->gbsc", weights, normed)
    assert fused.shape == (fusion.num_groups, B, S, C)
    np.testing.assert_allclose(fused, expected, atol=1e-4)


def test_uniform_is_the_mean_of_normalized_layers():
    h = hidden()
    fused = LayerFusion(L, D, "uniform")(h)
    expected = reference_layer_norm(h.double().numpy()).mean(0)
    np.testing.assert_allclose(fused[0].double().numpy(), expected, atol=1e-4)


def test_normalized_input_path_equals_raw_path():
    fusion = LayerFusion(L, D, "depth")
    h = hidden()
    torch.testing.assert_close(fusion(h), fusion(LayerFusion.normalize(h), normalized=True))


@pytest.mark.parametrize("strategy", LEARNED)
def test_gradients_reach_gate_parameters(strategy):
    fusion = LayerFusion(L, D, strategy)
    target = torch.randn(fusion.num_groups, B, S, C)
    loss = (fusion(hidden(), torch.rand(B)) - target).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in fusion.parameters()]
    assert grads and all(g is not None for g in grads)
    # The zero-initialised output layer (or the logits) must receive a non-zero gradient.
    assert any(g.abs().sum() > 0 for g in grads)


def _train_towards_time_dependent_target(fusion, steps=30):
    """Push weight to layer 0 for t < 0.5 and to the last layer for t >= 0.5."""
    opt = torch.optim.Adam(fusion.parameters(), lr=0.05)
    for _ in range(steps):
        t = torch.rand(64)
        w = fusion.group_weights(t) if fusion.depends_on_t else fusion.group_weights().expand(64, -1, -1)
        wanted = torch.where(t[:, None] < 0.5, w[..., 0], w[..., -1])
        loss = -wanted.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("strategy", ["time", "joint"])
def test_time_strategies_learn_weights_that_change_with_t(strategy):
    fusion = LayerFusion(L, D, strategy)
    assert fusion.depends_on_t
    _train_towards_time_dependent_target(fusion)
    w = fusion.layer_weights(torch.tensor([0.1, 0.9]))
    assert w[0, :, 0].min() > w[1, :, 0].max()
    assert w[1, :, -1].min() > w[0, :, -1].max()


def test_depth_weights_do_not_depend_on_t():
    fusion = LayerFusion(L, D, "depth")
    assert not fusion.depends_on_t
    _train_towards_time_dependent_target(fusion)
    assert not torch.allclose(fusion.layer_weights(), torch.full((D, L), 1 / L))  # it did learn something
    h = hidden()
    torch.testing.assert_close(fusion(h, torch.zeros(B)), fusion(h, torch.ones(B)))
    torch.testing.assert_close(fusion.layer_weights(torch.zeros(1)), fusion.layer_weights(torch.ones(1)))


def test_time_strategy_requires_t():
    with pytest.raises(ValueError, match="depends on t"):
        LayerFusion(L, D, "time")(hidden())


def test_unknown_strategy_lists_valid_choices():
    with pytest.raises(ValueError) as err:
        check_strategy("layerwise")
    for name in STRATEGIES:
        assert name in str(err.value)


def test_paper_ids_map_to_strategies():
    assert [check_strategy(k) for k in PAPER_IDS] == list(STRATEGIES)


def test_wrong_layer_count_is_an_error():
    with pytest.raises(ValueError, match="expects 7 LLM layers but got 6"):
        LayerFusion(L, D, "depth")(hidden()[:6])
    with pytest.raises(ValueError, match="outside"):
        LayerFusion(L, D, "single", single_layer=L)


@pytest.mark.parametrize("strategy", LEARNED)
def test_one_optimizer_step_moves_logits_by_about_the_fusion_lr(strategy):
    torch.manual_seed(0)
    fusion = LayerFusion(30, 6, strategy)
    lr = 3e-2
    opt = torch.optim.AdamW(fusion.optimizer_groups(lr))
    t = torch.rand(64)
    before = fusion.group_logits(t).detach().clone()
    loss = (fusion.group_weights(t) * torch.randn(30)).sum()
    loss.backward()
    opt.step()
    moved = (fusion.group_logits(t).detach() - before).abs().max().item()
    # Plain logits move by exactly lr; the time gates by a small multiple, not by fan-in (128) times.
    assert lr * 0.5 < moved < 4 * lr


def test_the_strategy_table_is_the_one_source_of_names():
    from typing import get_args

    from semroute.fusion import PAPER_IDS, PAPER_NAMES, STRATEGY_TABLE, Strategy

    assert tuple(STRATEGY_TABLE) == get_args(Strategy)
    # The order of the paper's Table 1, then the schemes of released models
    assert list(PAPER_IDS) == ["b1", "b2", "b3", "fusedit", "s1", "s2", "s3", "flux2", "unifusion", "hidream"]
    assert PAPER_NAMES["s2"] == "S2 depth-wise" and PAPER_NAMES["fusedit"] == "FuseDiT deep"
    learned = ("static", "time", "depth", "joint", "layer_attention")
    for name, spec in STRATEGY_TABLE.items():
        fusion = LayerFusion(3 if name == "deep" else 5, 3, name, text_dim=8)
        assert fusion.depends_on_t == spec.depends_on_t == (name in ("time", "joint"))
        assert fusion.num_groups == (3 if name in ("depth", "joint", "deep", "hard") else 1)
        assert spec.text_features == ("keys_values" if name == "deep" else "hidden_states")
        assert any(True for _ in fusion.parameters()) == (name in learned)
        assert bool(spec.shipped_by) == (name in ("concat", "layer_attention", "hard"))
