"""The fusion schemes of released models, each against an independent re-computation and end to end."""

import json

import numpy as np
import pytest
import torch
import yaml

from semroute.cli import main
from semroute.dit import DIT_PRESETS, SemanticRoutingDiT
from semroute.fusion import LayerFusion, block_pairing, resolve_taps

from .conftest import tiny_run_config
from .test_fusion import reference_layer_norm

L, D, B, S, C = 8, 3, 2, 5, 16


def hidden(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, B, S, C, generator=g) * torch.logspace(0, 2, L).view(L, 1, 1, 1) + 20.0


def test_taps_map_the_published_depths_onto_the_llm_in_use():
    # FLUX.2 dev reads hidden states 10, 20, 30 of Mistral-3 Small's 40 layers; Klein 9, 18, 27 of Qwen3's 36.
    assert [e + 1 for e in resolve_taps([0.25, 0.5, 0.75], 40)] == [10, 20, 30]
    assert [e + 1 for e in resolve_taps([0.25, 0.5, 0.75], 36)] == [9, 18, 27]
    assert [e + 1 for e in resolve_taps([0.25, 0.5, 0.75], 30)] == [8, 15, 22]  # SmolLM2 (round half to even)
    # HiDream-I1: block i reads layer i when there are as many layers as blocks; else the same relative depth.
    assert block_pairing(32, 32) == list(range(32)) and block_pairing(30, 6) == [4, 9, 14, 19, 24, 29]
    for bad in ([], [0.0], [1.5], [0.5, 0.5]):
        with pytest.raises(ValueError, match="fusion_taps"):
            resolve_taps(bad, 30)
    with pytest.raises(ValueError, match="applies to strategies concat and layer_attention"):
        LayerFusion(L, D, "depth", taps=[0.5])


def test_concat_stacks_the_normalized_taps_along_channels():
    h = hidden()
    fusion = LayerFusion(L, D, "concat", taps=[0.25, 0.75, 1.0])
    assert fusion.taps == [1, 5, 7] and fusion.output_dim(C) == 3 * C
    fused = fusion(h).double().numpy()  # (1, B, S, 3C)
    normed = reference_layer_norm(h.double().numpy())
    expected = np.concatenate([normed[1], normed[5], normed[7]], axis=-1)[None]
    np.testing.assert_allclose(fused, expected, atol=1e-4)
    # The DiT projects the stacked channels with one RMSNorm + Linear (FLUX.2's one Linear, Ideogram 4's
    # RMSNorm + Linear); the learned shares of that projection are what routing draws, one per tap.
    model = SemanticRoutingDiT(**DIT_PRESETS["tiny"], text_dim=C, num_text_layers=L, strategy="concat")
    assert model.context_embedder.proj.in_features == 3 * C
    shares = model.routing_weights()
    assert shares.shape == (2, L) and torch.allclose(shares.sum(-1), torch.ones(2))
    assert set(shares[0].nonzero().flatten().tolist()) == set(model.fusion.taps)


def test_layer_attention_starts_uniform_and_matches_an_independent_recomputation():
    h = hidden()
    fusion = LayerFusion(L, D, "layer_attention", text_dim=C).eval()
    normed = reference_layer_norm(h.double().numpy())
    # Zero key projection: every weight is 1/L, the plain mean (B2), whatever the query.
    np.testing.assert_allclose(fusion(h).detach().double().numpy()[0], normed.mean(0), atol=1e-4)
    torch.manual_seed(2)
    with torch.no_grad():
        fusion.attention_key.normal_(0, 0.3)
    fused = fusion(h).detach().double().numpy()
    q = fusion.attention_query.detach().double().numpy()  # (1, A)
    k = fusion.attention_key.detach().double().numpy()  # (C, A)
    scores = np.einsum("ga,lbsa->gbsl", q, normed @ k) / np.sqrt(k.shape[1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("gbsl,lbsc->gbsc", weights, normed)
    np.testing.assert_allclose(fused, expected, atol=1e-4)
    assert weights.std(-1).mean() > 0.01  # the weights moved away from uniform and differ by token
    # Training forwards keep a running mean of the weights over real tokens only: padding never counts.
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 2:] = False
    garbage = h.clone()
    garbage[:, 1, 2:] = 1e3 * torch.randn_like(garbage[:, 1, 2:])
    fusion.train()
    fusion(garbage, mask=mask)
    real = weights[0][mask.numpy()].mean(0)  # (L,)
    expected_mean = 0.99 * (1 / L) + 0.01 * real
    np.testing.assert_allclose(fusion.attention_mean[0].double().numpy(), expected_mean, atol=1e-6)


def test_hard_routing_gives_each_block_its_own_normalized_layer():
    h = hidden()
    fusion = LayerFusion(L, D, "hard")
    fused = fusion(h).double().numpy()  # (D, B, S, C)
    normed = reference_layer_norm(h.double().numpy())
    assert fusion.pairing == [2, 4, 7] and fused.shape == (D, B, S, C)
    for d, entry in enumerate(fusion.pairing):
        np.testing.assert_allclose(fused[d], normed[entry], atol=1e-4)
    assert not list(fusion.parameters())


@pytest.fixture(scope="module")
def shipped_runs(tiny_llama_dir, tmp_path_factory):
    """A short CLI run of each new scheme (and GRAN-TED's frozen weights), checkpointing halfway."""
    root = tmp_path_factory.mktemp("shipped")
    runs = {}
    for name, extra in {
        "concat": [],
        "layer_attention": [],
        "hard": [],
        "static-frozen": ["--set", "train.freeze_fusion_after=2"],
    }.items():
        strategy = name.split("-")[0]
        raw = tiny_run_config(tiny_llama_dir, strategy=strategy, max_steps=4, checkpoint_every=2, log_every=2)
        config = root / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        out = root / name
        args = ["train", "--config", str(config), "--out", str(out), "--device", "cpu", *extra]
        assert main(args) == 0
        runs[name] = (config, out, extra)
    return runs


@pytest.mark.parametrize("name", ["concat", "layer_attention", "hard"])
def test_each_scheme_trains_samples_exports_routes_and_resumes(shipped_runs, tmp_path, name):
    from semroute.checkpoint import load_raw_weights

    config, out, extra = shipped_runs[name]
    final = out / "checkpoints" / "step_000004"
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    model = SemanticRoutingDiT.from_pretrained(final)
    assert model.config.strategy == name
    png, routing = tmp_path / "s.png", tmp_path / "r.png"
    args = ["--checkpoint", str(out)]
    assert (
        main(["sample", *args, "--prompt", "two red circles", "--n", "2", "--steps", "2", "--out", str(png)])
        == 0
    )
    assert main(["routing", *args, "--out", str(routing)]) == 0
    assert main(["export", *args, "--out", str(tmp_path / "pipe")]) == 0
    assert png.stat().st_size > 500 and routing.stat().st_size > 1000
    from semroute.pipeline import SemanticRoutingPipeline

    pipe = SemanticRoutingPipeline.from_pretrained(tmp_path / "pipe")
    exported = pipe.transformer.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    # Resume: a run stopped at step 2 and continued ends where the uninterrupted one ended.
    resumed = tmp_path / "resumed"
    step2 = out / "checkpoints" / "step_000002"
    import shutil

    shutil.copytree(step2, resumed / "checkpoints" / "step_000002")
    assert main(["train", "--config", str(config), "--out", str(resumed), "--device", "cpu", *extra]) == 0
    a, b = load_raw_weights(final), load_raw_weights(resumed / "checkpoints" / "step_000004")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_fusion_weights_stay_while_the_dit_trains(shipped_runs, tiny_llama_dir, tmp_path, capsys):
    from semroute.checkpoint import load_raw_weights

    _, out, _ = shipped_runs["static-frozen"]
    step2, step4 = (load_raw_weights(out / "checkpoints" / f"step_00000{k}") for k in (2, 4))
    assert not torch.equal(step2["fusion.logits"], torch.zeros_like(step2["fusion.logits"]))  # learned first
    assert torch.equal(step2["fusion.logits"], step4["fusion.logits"])  # then frozen
    assert not torch.equal(
        step2["final_layer.proj.weight"], step4["final_layer.proj.weight"]
    )  # the DiT trains
    raw = tiny_run_config(tiny_llama_dir, strategy="uniform", max_steps=2)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "x"),
            "--set",
            "train.freeze_fusion_after=1",
        ]
    )
    assert code != 0 and "strategy 'uniform' has none" in capsys.readouterr().err


def _synthetic(rate: float, seed: int, prompts: int = 12) -> dict:
    """A ShapesBench result whose every prompt is right with probability `rate` (4 images, exact)."""
    right = round(4 * rate)
    rows = [
        {"category": category, "prompt": f"{category} {i}", "correct": [True] * right + [False] * (4 - right)}
        for category in ("counting", "colour")
        for i in range(prompts)
    ]
    categories = {"counting": right / 4, "colour": right / 4, "two_objects": right / 4, "position": right / 4}
    return {"seed": seed, "prompts": rows, "categories": categories, "overall": right / 4, "fidelity": 1.0}


def test_released_schemes_are_set_against_b2_and_s2_with_intervals():
    from semroute.bench.claims import comparisons, table_markdown

    found = {
        "b2": [_synthetic(0.25, s) for s in range(3)],
        "s2": [_synthetic(0.5, s) for s in range(3)],
        "flux2": [_synthetic(0.5, s) for s in range(3)],
    }
    got = {(c["row"], c["baseline"], c["column"]): c for c in comparisons(found)}
    assert set(got) == {("flux2", b, c) for b in ("b2", "s2") for c in ("overall", "counting")}
    better = got[("flux2", "b2", "counting")]
    assert better["verdict"] == "better" and better["bootstrap"]["mean"] == pytest.approx(0.25)
    assert better["bootstrap"]["pairs"] == 36  # 3 seeds x 12 counting prompts
    tie = got[("flux2", "s2", "overall")]
    assert tie["verdict"] == "no difference shown" and tie["bootstrap"]["ci95"] == [0.0, 0.0]
    # A row absent from the ablation is not compared; no baseline: nothing at all.
    assert comparisons({"flux2": found["flux2"]}) == []
    found["b2"] = [_synthetic(0.75, s) for s in range(3)]
    assert {c["verdict"] for c in comparisons(found) if c["baseline"] == "b2"} == {"worse"}
    table = table_markdown(found, [])
    assert "| flux2 vs b2 | counting | " in table and table.count("| worse |") == 2
    assert "| flux2 vs s2 | overall | " in table and "| no difference shown |" in table
