import json
import shutil
from pathlib import Path

import pytest
import yaml

from semroute.bench.ablation import run_ablation
from semroute.bench.claims import claim_interval, claims, paired_bootstrap, table_markdown
from semroute.bench.rows import parse_strategies
from semroute.cli import main
from semroute.config import load_config
from semroute.fusion import PAPER_NAMES

from .conftest import tiny_run_config


def fake_result(sid, seed, counting, overall, fidelity):
    prompts = [
        {"category": "counting", "prompt": f"p{i}", "correct": [ok, ok]} for i, ok in enumerate(counting)
    ]
    return {
        "version": "shapesbench-2",
        "strategy": sid,
        "seed": seed,
        "steps": 10,
        "overall": overall,
        "fidelity": fidelity,
        "categories": {
            "counting": sum(counting) / len(counting),
            "colour": 1.0,
            "two_objects": 0.5,
            "position": 0.25,
        },
        "prompts": prompts,
    }


def test_table_and_claims_from_fixed_results():
    found = {
        "b1": [fake_result("b1", s, [True, False, False, False], 0.40, 0.90) for s in range(3)],
        "s1": [fake_result("s1", s, [True, True, False, False], 0.45, 0.60) for s in range(3)],
        "s2": [fake_result("s2", s, [True, True, True, True], 0.70 + 0.01 * s, 0.95) for s in range(3)],
    }
    checked = claims(found)
    assert [c["claim"] for c in checked] == [
        "S2 beats B1 on counting",
        "S2 is best overall",
        "S1 has the lowest fidelity",
    ]
    assert all(c["agrees"] for c in checked)
    assert checked[0]["bootstrap"]["mean"] == pytest.approx(0.75)
    table = table_markdown(found, checked)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "±" in line]
    # Paper order
    assert [r.split(" | ")[0][2:] for r in rows] == [
        PAPER_NAMES["b1"],
        PAPER_NAMES["s1"],
        PAPER_NAMES["s2"],
    ]
    assert (
        "| S2 depth-wise | 3 | 100.0 ± 0.0 | 100.0 ± 0.0 | 50.0 ± 0.0 | 25.0 ± 0.0 | 71.0 ± 1.0 "
        "| 95.0 ± 0.0 |" in table
    )
    assert "| S1 has the lowest fidelity | lowest fidelity of the paper's rows: S1 time-wise | yes |" in table
    # The released models' schemes are set beside the paper's rows, never judged as one of them: a scheme
    # that scores higher overall or lower in fidelity leaves the paper's claims as they were.
    for sid in ("flux2", "unifusion", "hidream", "granted"):
        found[sid] = [fake_result(sid, s, [True, True, True, True], 0.99, 0.10) for s in range(3)]
    assert [c["agrees"] for c in claims(found)] == [True, True, True]
    assert "best overall of the paper's rows: S2 depth-wise" in table_markdown(found, claims(found))


def test_claims_can_disagree():
    found = {
        "b1": [fake_result("b1", 0, [True, True, False, False], 0.8, 0.5)],
        "s2": [fake_result("s2", 0, [True, False, False, False], 0.5, 0.9)],
    }
    checked = claims(found)
    assert not checked[0]["agrees"] and not checked[1]["agrees"]
    tied = {sid: [fake_result(sid, 0, [False], 0.0, 0.0)] for sid in ("b1", "s1", "s2")}
    checked = claims(tied)
    assert not any(c["agrees"] for c in checked)
    assert (
        checked[2]["ours"]
        == "lowest fidelity of the paper's rows: B1 penultimate = S1 time-wise = S2 depth-wise (tied at 0.0)"
    )


def test_claim_intervals_are_the_ones_the_claims_are_judged_by():
    """S1 - B2 fidelity per seed is -0.3, -0.1, -0.2: mean
    -0.2, SE 0.1/sqrt(3); a loss needs mean + 2 SE < 0."""
    found = {
        "b2": [fake_result("b2", s, [True], 0.5, 0.9) for s in range(3)],
        "s1": [fake_result("s1", s, [True], 0.5, f) for s, f in enumerate((0.6, 0.8, 0.7))],
    }
    (checked,) = [c for c in claims(found) if c["claim"].endswith("loses fidelity against B2")]
    se = 0.1 / 3**0.5
    assert claim_interval(checked) == pytest.approx((-20.0, 100 * (-0.2 - 2 * se), 100 * (-0.2 + 2 * se)))
    assert checked["agrees"] and claim_interval(checked)[2] < 0  # the whole interval is below 0: a loss
    boot = {"claim": "x", "bootstrap": {"mean": 0.05, "ci95": [-0.01, 0.12]}}
    assert claim_interval(boot) == pytest.approx((5.0, -1.0, 12.0))
    assert claim_interval({"claim": "S2 is best overall", "ours": "...", "agrees": True}) is None


def test_paired_bootstrap_interval():
    a = {(0, i): 1.0 for i in range(50)}
    b = {(0, i): 0.0 if i % 2 else 1.0 for i in range(50)}
    boot = paired_bootstrap(a, b)
    assert boot["mean"] == pytest.approx(0.5) and boot["pairs"] == 50
    assert 0.3 < boot["ci95"][0] < 0.5 < boot["ci95"][1] < 0.7
    same = paired_bootstrap(a, a)
    assert same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="no paired"):
        paired_bootstrap(a, {(1, 0): 1.0})


def test_parse_strategies():
    assert parse_strategies("s2, b1, fusedit") == ["b1", "fusedit", "s2"]  # the paper's order
    with pytest.raises(
        ValueError,
        match="valid: b1, b2, b3, fusedit, s1, s2, s3 .the paper.s., s1s, s1e, s3e .gate variants., "
        "flux2, unifusion, hidream, granted .schemes of released models.",
    ):
        parse_strategies("b1,s9")
    assert parse_strategies("granted,hidream,b1") == ["b1", "hidream", "granted"]


def test_ablation_end_to_end_and_resume(tiny_llama_dir, tiny_encoder, tmp_path, monkeypatch):
    raw = tiny_run_config(tiny_llama_dir)
    raw["data"].update(two_object_fraction=0.2, position_fraction=0.2, exclude_bench_prompts=True)
    base = load_config(raw)
    out = tmp_path / "ablation"
    # An interrupted run left behind: it is kept aside, not deleted.
    (out / "runs" / "s3-seed0").mkdir(parents=True)
    (out / "runs" / "s3-seed0" / "log.jsonl").write_text("{}\n")
    base.train.checkpoint_every = 2  # also writes a sample grid while bench prompts are held out
    # An interrupted run with a checkpoint: resumed, not restarted.
    import copy

    from semroute.train import train

    partial = copy.deepcopy(base)
    partial.model.strategy = "depth"
    train(partial, out / "runs" / "s2-seed0", max_steps=2, progress=False, encoder=tiny_encoder)
    result = run_ablation(
        base, out, ["b1", "s1", "s2", "s3"], 1, None, 1, max_steps=4, encoder=tiny_encoder, progress=False
    )
    for name in (
        "table.md",
        "results.json",
        "bars.png",
        "routing-s1.png",
        "routing-s2.png",
        "routing-s3.png",
    ):
        assert (out / name).stat().st_size > 100, name
    assert (out / "runs" / "s3-seed0.interrupted" / "log.jsonl").is_file()
    assert not (out / "runs" / "s2-seed0.interrupted").exists()
    assert json.loads((out / "runs" / "s2-seed0" / "shapesbench.json").read_text())["steps"] == 4
    assert {c["claim"] for c in result["claims"]} == {
        "S2 beats B1 on counting",
        "S2 is best overall",
        "S1 has the lowest fidelity",
    }
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["summary"]) == {"b1", "s1", "s2", "s3"}
    # Re-running trains nothing: every run is finished.
    monkeypatch.setattr(
        "semroute.bench.ablation.train", lambda *a, **k: pytest.fail("a finished run was trained again")
    )
    again = run_ablation(
        base, out, ["b1", "s1", "s2", "s3"], 1, None, 1, max_steps=4, encoder=tiny_encoder, progress=False
    )
    assert again["summary"] == result["summary"]
    # A run scored by an older ShapesBench is never mixed in: it is scored again from its checkpoint, not
    # retrained.
    path = out / "runs" / "b1-seed0" / "shapesbench.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "version": "shapesbench-1", "overall": 0.99}))
    with pytest.raises(ValueError, match="scored with shapesbench-1, not shapesbench-2"):
        from semroute.bench.ablation import summarize_ablation

        summarize_ablation(out, ["b1", "s1", "s2", "s3"], 1)
    rescored = run_ablation(
        base, out, ["b1", "s1", "s2", "s3"], 1, None, 1, max_steps=4, encoder=tiny_encoder, progress=False
    )
    assert json.loads(path.read_text())["version"] == "shapesbench-2"
    assert rescored["summary"] == result["summary"]
    # Carried to another directory as records only (no checkpoints, no logs): nothing is trained or scored
    # again, the tables come out the same and the routing figures drawn when the runs were trained are kept.
    from semroute.bench.ablation import export_records

    records = tmp_path / "records"
    written = export_records(out, records)
    assert not any("checkpoint" in str(p.relative_to(records)) for p in written)
    assert {p.name for p in (records / "runs" / "s2-seed0").iterdir()} == {
        "finished.json",
        "run_config.yaml",
        "shapesbench.json",
        "summary.json",
    }
    assert not (records / "runs" / "s3-seed0.interrupted").exists()  # kept aside, not finished
    carried = tmp_path / "carried"
    shutil.copytree(records, carried)
    drawn = (carried / "routing-s2.png").read_bytes()
    monkeypatch.setattr(
        "semroute.bench.ablation.run_bench", lambda *a, **k: pytest.fail("a scored run was scored again")
    )
    moved = run_ablation(
        base, carried, ["b1", "s1", "s2", "s3"], 1, None, 1, max_steps=4, encoder=tiny_encoder, progress=False
    )
    assert moved["summary"] == result["summary"]
    assert (carried / "routing-s2.png").read_bytes() == drawn
    assert (carried / "table.md").read_text() == (out / "table.md").read_text()
    # A figure that was never drawn is reported missing, not faked; a new scale needs the checkpoint back.
    (carried / "routing-s1.png").unlink()
    run_ablation(
        base, carried, ["b1", "s1", "s2", "s3"], 1, None, 1, max_steps=4, encoder=tiny_encoder, progress=False
    )
    assert not (carried / "routing-s1.png").exists()
    with pytest.raises(
        ValueError, match="records only .its checkpoint .* is not.: scoring it at guidance scale 7"
    ):
        run_ablation(
            base,
            carried,
            ["b1", "s1", "s2", "s3"],
            1,
            None,
            1,
            max_steps=4,
            encoder=tiny_encoder,
            progress=False,
            scales=[base.sample.guidance_scale, 7.0],
        )


def test_cli_ablate_rejects_unknown_strategy(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path / "a"), "--strategies", "b1,x2"]) == 2
    assert "valid: b1, b2, b3, fusedit, s1, s2, s3 (the paper's)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_cli_ablate_quick_sized_run(tiny_llama_dir, tmp_path):
    raw = tiny_run_config(tiny_llama_dir)
    config = tmp_path / "ablation.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "quick"
    assert (
        main(
            [
                "ablate",
                "--out",
                str(out),
                "--config",
                str(config),
                "--strategies",
                "b1,s2",
                "--quick",
                "--max-steps",
                "2",
                "--export",
                str(tmp_path / "records"),
            ]
        )
        == 0
    )
    assert "S2 depth-wise" in (out / "table.md").read_text()
    assert (tmp_path / "records" / "table.md").read_text() == (out / "table.md").read_text()
    assert (tmp_path / "records" / "runs" / "s2-seed0" / "shapesbench.json").is_file()
    assert not list((tmp_path / "records").rglob("*.safetensors"))


def test_gate_variants_at_several_guidance_scales(tiny_llama_dir, tiny_encoder, tmp_path, monkeypatch):
    """The trajectory experiment's table: t-free rows, s1s
    sampled from S1's checkpoints, every run at every scale."""
    raw = tiny_run_config(tiny_llama_dir)
    raw["model"]["timestep_conditioning"] = "none"
    raw["sample"]["guidance_scale"] = 3.0
    base = load_config(raw)
    out = tmp_path / "trajectory"
    rows = ["b2", "s1", "s1s", "s1e"]
    with pytest.raises(ValueError, match="pass --gate-shift"):
        run_ablation(
            base, out, rows, 1, None, 1, max_steps=3, encoder=tiny_encoder, progress=False, scales=[1.5, 3.0]
        )
    result = run_ablation(
        base,
        out,
        rows,
        1,
        None,
        1,
        max_steps=3,
        encoder=tiny_encoder,
        progress=False,
        scales=[1.5, 3.0],
        gate_shift=2.0,
    )
    runs = out / "runs"
    assert not (runs / "s1s-seed0" / "checkpoints").exists()  # sampled, never trained
    for row in rows:
        for name in ("shapesbench-cfg1.5.json", "shapesbench.json"):  # 3.0 is the config's own scale
            scored = json.loads((runs / f"{row}-seed0" / name).read_text())
            assert scored["sampling"]["guidance_scale"] == (1.5 if "1.5" in name else 3.0)
            assert scored["sampling"]["gate_shift"] == (2.0 if row == "s1s" else 1.0)
    s1s = json.loads((runs / "s1s-seed0" / "shapesbench.json").read_text())
    s1 = json.loads((runs / "s1-seed0" / "shapesbench.json").read_text())
    # Records store paths relative to their own directory: both name S1's checkpoint.
    assert (runs / "s1s-seed0" / s1s["checkpoint"]).resolve() == (
        runs / "s1-seed0" / s1["checkpoint"]
    ).resolve()
    from semroute.dit import SemanticRoutingDiT

    assert SemanticRoutingDiT.from_pretrained(runs / "s1e-seed0" / s1["checkpoint"]).noise_head is not None
    table = (out / "table.md").read_text()
    assert "## Guidance scale 1.5" in table and "## Guidance scale 3" in table
    assert "| S1 time-wise, shifted gate | 1 |" in table and "| S1 time-wise, estimated gate | 1 |" in table
    assert set(result["scales"]) == {1.5, 3.0}
    assert {c["claim"] for c in result["scales"][1.5]["claims"]} >= {
        "S1 time-wise loses fidelity against B2",
        "S1 time-wise, estimated gate loses fidelity against B2",
    }
    assert (out / "scales.png").stat().st_size > 1000 and (out / "claims.png").stat().st_size > 1000
    # A new scale later is scored from the saved checkpoints: nothing is trained again.
    monkeypatch.setattr(
        "semroute.bench.ablation.train", lambda *a, **k: pytest.fail("a finished run was trained again")
    )
    again = run_ablation(
        base,
        out,
        rows,
        1,
        None,
        1,
        max_steps=3,
        encoder=tiny_encoder,
        progress=False,
        scales=[1.5, 3.0, 5.0],
        gate_shift=2.0,
    )
    assert (
        set(again["scales"]) == {1.5, 3.0, 5.0} and (runs / "s1e-seed0" / "shapesbench-cfg5.json").is_file()
    )


def test_eval_scores_several_guidance_scales_from_one_checkpoint(tiny_llama_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=2)))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "bench.json"
    assert (
        main(
            ["eval", "--checkpoint", str(tmp_path / "run"), "--cfg", "1.5,3,5", "--n", "1", "--out", str(out)]
        )
        == 0
    )
    scored = json.loads(out.read_text())
    assert list(scored["scales"]) == ["1.5", "3", "5"]
    assert [r["sampling"]["guidance_scale"] for r in scored["scales"].values()] == [1.5, 3.0, 5.0]
    capsys.readouterr()
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "run"), "--cfg", "1.5,7", "--n", "1", "--out", str(out)])
        == 2
    )
    assert "holds results of other settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a usage error
        main(["eval", "--checkpoint", str(tmp_path / "run"), "--cfg", "3,3", "--n", "1"])
    assert "must be distinct scales" in capsys.readouterr().err


def test_fusedit_is_a_row_of_the_table_with_its_own_text_features(tiny_llama_dir, tiny_encoder, tmp_path):
    """FuseDiT deep fusion beside B1 in one ablation: its runs
    read keys/values, B1's hidden states, one LLM for both."""
    raw = tiny_run_config(tiny_llama_dir)
    raw["model"]["num_heads"] = 4  # 4 heads of 8: grouped over the tiny Llama's 2 key/value heads of 8
    base = load_config(raw)
    out = tmp_path / "deep"
    result = run_ablation(
        base, out, ["fusedit", "b1"], 1, None, 1, max_steps=3, encoder=tiny_encoder, progress=False
    )
    runs = out / "runs"
    for row, kind in (("b1", "hidden_states"), ("fusedit", "keys_values")):
        checkpoint = (
            runs
            / f"{row}-seed0"
            / json.loads((runs / f"{row}-seed0" / "shapesbench.json").read_text())["checkpoint"]
        )
        assert json.loads((Path(checkpoint) / "text_encoder.json").read_text())["features"] == kind
    table = (out / "table.md").read_text()
    assert table.index("| B1 penultimate |") < table.index("| FuseDiT deep |")  # the paper's order
    assert "FuseDiT deep scores below B1 overall" in {c["claim"] for c in result["claims"]}
    assert (out / "routing-fusedit.png").stat().st_size > 1000


def test_the_granted_row_is_static_weights_frozen_after_a_quarter_of_the_budget(tiny_llama_dir):
    from semroute.bench.ablation import _variant_config
    from semroute.config import load_config

    from .conftest import tiny_run_config

    base = load_config(tiny_run_config(tiny_llama_dir, max_steps=40))
    config = _variant_config(base, "granted", seed=1, max_steps=100)  # the ablation's --max-steps wins
    assert config.model.strategy == "static" and config.train.freeze_fusion_after == 25
    assert _variant_config(base, "granted", seed=1).train.freeze_fusion_after == 10
    assert _variant_config(base, "flux2", seed=1).model.strategy == "concat"
    assert _variant_config(base, "s2", seed=1).train.freeze_fusion_after == 0
