import json
from pathlib import Path

import pytest
import torch
import yaml

from semroute.checkpoint import load_raw_weights, resolve_checkpoint
from semroute.cli import main
from semroute.config import load_config
from semroute.dit import SemanticRoutingDiT
from semroute.flow import RectifiedFlow
from semroute.pipeline import SemanticRoutingPipeline
from semroute.train import train

from .conftest import tiny_run_config


def fixed_batch_loss(model, features, dataset, null_id):
    """Loss on a fixed batch with fixed noise and times: comparable before and after training."""
    xs, ids = zip(*(dataset[i] for i in range(10**8, 10**8 + 64)), strict=True)
    x0, ids = torch.stack(xs), torch.tensor(ids)
    text, mask = features.select(ids)
    with torch.no_grad():
        return (
            RectifiedFlow()
            .loss(
                lambda x, t: model(x, t, text.float(), mask, text_normalized=True),
                x0,
                torch.Generator().manual_seed(0),
            )
            .item()
        )


@pytest.fixture(scope="module")
def trained_run(tiny_llama_dir, tiny_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = load_config(tiny_run_config(tiny_llama_dir, max_steps=60, checkpoint_every=30))
    result = train(config, out, progress=False, encoder=tiny_encoder)
    return config, out, result


def test_short_training_lowers_the_loss_and_moves_the_gates(trained_run, tiny_encoder):
    from semroute.data.shapes import ShapesDataset, ShapesTask
    from semroute.features import prompt_table

    config, out, result = trained_run
    assert result.steps == 60
    dataset = ShapesDataset(ShapesTask(config.data), seed=config.train.seed)
    features = prompt_table(tiny_encoder, dataset.captions, torch.float32, progress=False)
    null_id = len(dataset.captions)
    trained = SemanticRoutingDiT(**config.model.dit_kwargs(), text_dim=32, num_text_layers=4)
    trained.load_state_dict(load_raw_weights(result.checkpoint))
    torch.manual_seed(config.train.seed)
    initial = SemanticRoutingDiT(**config.model.dit_kwargs(), text_dim=32, num_text_layers=4)
    # adaLN-zero starts at zero velocity; compare the trained loss with that starting loss.
    assert fixed_batch_loss(trained, features, dataset, null_id) < 0.8 * fixed_batch_loss(
        initial, features, dataset, null_id
    )
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(5, 61, 5))
    assert (
        logs[-1]["fusion_entropy"] < logs[0]["fusion_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    )
    assert not torch.allclose(trained.fusion.logits, torch.zeros_like(trained.fusion.logits))


def test_checkpoint_round_trips_exactly(trained_run, tiny_encoder):
    config, out, result = trained_run
    assert resolve_checkpoint(out) == result.checkpoint == out / "checkpoints" / "step_000060"
    assert (out / "checkpoints" / "step_000030" / "config.json").is_file()
    assert (out / "samples" / "step_000030.png").stat().st_size > 1000  # EMA sample grid at each checkpoint
    reloaded = SemanticRoutingDiT.from_pretrained(result.checkpoint)
    assert reloaded.config.strategy == "depth" and reloaded.config.num_text_layers == 4
    # The diffusers weights are the EMA weights; the raw ones are kept for training.
    raw = load_raw_weights(result.checkpoint)
    ema = reloaded.state_dict()
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    reloaded.save_pretrained(out / "again")
    again = SemanticRoutingDiT.from_pretrained(out / "again").state_dict()
    assert all(torch.equal(again[k], ema[k]) for k in ema)
    saved = yaml.safe_load((result.checkpoint / "run_config.yaml").read_text())
    assert load_config(saved) == config
    pipe = SemanticRoutingPipeline.from_checkpoint(result.checkpoint)
    images = pipe.generate(["one red square"], num_inference_steps=3, guidance_scale=2.0)
    assert images.shape == (1, 3, 12, 12)


def test_cli_sample_and_routing(trained_run, tmp_path, capsys):
    _, out, _ = trained_run
    png = tmp_path / "s.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(out),
                "--prompt",
                "two red circles",
                "--n",
                "2",
                "--steps",
                "3",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert png.stat().st_size > 1000
    routing = tmp_path / "r.png"
    assert main(["routing", "--checkpoint", str(out), "--out", str(routing)]) == 0
    assert routing.stat().st_size > 1000


def test_cli_train_end_to_end(tiny_llama_dir, tmp_path):
    for strategy in ("time", "single"):
        cfg = tmp_path / f"{strategy}.yaml"
        cfg.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, strategy)))
        out = tmp_path / f"run-{strategy}"
        assert main(["train", "--config", str(cfg), "--out", str(out), "--max-steps", "3"]) == 0
        assert (out / "checkpoints" / "step_000003" / "diffusion_pytorch_model.safetensors").is_file()
    assert (
        main(["routing", "--checkpoint", str(tmp_path / "run-time"), "--out", str(tmp_path / "t.png")]) == 0
    )


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"model": {"preset": "tiny", "strategy": "layerwise"}},
            "valid: single, uniform, static, deep, time, depth, joint",
        ),
        (
            {"model": {"preset": "huge"}},
            "unknown model.preset 'huge'; valid: paper, cpu-small, cpu-small-tfree, tiny",
        ),
        ({"model": {"preset": "tiny", "dropout": 0.1}}, "unknown config key model.dropout"),
        ({"model": {"preset": "tiny", "text_dim": 8}}, "set from the text encoder"),
        ({"model": {"preset": "tiny", "depth": "deep"}}, "model.depth must be of type int"),
        (
            {"optimizer": {}},
            "unknown config key optimizer; valid: model, text_encoder, data, dataset, train, sample",
        ),
        ({"train": {"batch_size": 16, "lr_decay": 1}}, "unknown config key train.lr_decay"),
        ({"train": {"batch_size": "big"}}, "train.batch_size must be of type int"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
        ({"sample": {"guidance_scale": 0.5}}, "guidance_scale must be >= 1"),
        ({"data": {"image_size": 16}}, "model.sample_size 12 differs from data.image_size 16"),
    ],
)
def test_bad_configs_exit_2_with_the_fix(tiny_llama_dir, tmp_path, capsys, change, message):
    config = tiny_run_config(tiny_llama_dir)
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if key != "model" else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    err = _error(capsys, ["train", "--config", str(path), "--out", str(out)])
    assert message in err
    assert not out.exists()


def test_missing_inputs_exit_2_and_create_nothing(tmp_path, capsys):
    png = tmp_path / "never.png"
    err = _error(
        capsys, ["sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", str(png)]
    )
    assert "does not exist" in err and not png.exists()
    err = _error(capsys, ["routing", "--checkpoint", str(tmp_path), "--out", str(png)])
    assert "neither a checkpoint nor a run directory" in err and not png.exists()
    err = _error(capsys, ["train", "--config", str(tmp_path / "none.yaml")])
    assert "does not exist" in err


def test_checkpoint_with_other_encoder_is_refused(trained_run, tmp_path, capsys):
    from .conftest import make_tiny_llama

    _, out, _ = trained_run
    other = make_tiny_llama(tmp_path / "other", num_layers=3, hidden=32)
    png = tmp_path / "x.png"
    err = _error(
        capsys,
        [
            "sample",
            "--checkpoint",
            str(out),
            "--prompt",
            "x",
            "--text-encoder",
            str(other),
            "--out",
            str(png),
        ],
    )
    assert "routes 4 LLM layers but the text encoder gives 3" in err and not png.exists()


def test_argument_errors_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as err:
        main(["sample", "--checkpoint", "x", "--prompt", "y", "--cfg", "0.5"])
    assert err.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", "x.yaml", "--max-steps", "0"])


def test_packaged_configs_load():
    from semroute.fusion import PAPER_IDS

    root = Path(__file__).parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert names == ["ablation.yaml", "demo.yaml", "emoji.yaml", "paper.yaml", "trajectory.yaml"]
    for name in names:
        load_config(root / name)
    # The real-image config fits what `semroute autoencoder` makes by default.
    from semroute.autoencoder import AutoencoderSettings

    emoji, made = load_config(root / "emoji.yaml"), AutoencoderSettings()
    model = emoji.model.settings()
    assert model["sample_size"] * made.downsample == emoji.dataset.resolution == made.resolution
    assert model["in_channels"] == made.latent_channels and emoji.dataset.background == made.background
    # The paper's six strategies are one config and one override each (by name or paper id).
    strategies = {
        sid: load_config(root / "paper.yaml", [f"model.strategy={sid}"]).model.dit_kwargs()["strategy"]
        for sid in PAPER_IDS
    }
    assert strategies == PAPER_IDS
    paper = load_config(root / "paper.yaml")
    assert (
        paper.model.dit_kwargs()["hidden_size"],
        paper.model.dit_kwargs()["depth"],
        paper.sample.guidance_scale,
    ) == (2048, 24, 6.5)


def test_model_config_is_typed_and_covers_every_dit_argument():
    import dataclasses
    import inspect

    from semroute.config import DERIVED_MODEL_KEYS, ModelConfig

    dit = [
        k
        for k in inspect.signature(SemanticRoutingDiT.__init__).parameters
        if k not in ("self", *DERIVED_MODEL_KEYS)
    ]
    assert [f.name for f in dataclasses.fields(ModelConfig)] == ["preset", *dit]
    config = load_config(
        {"model": {"preset": "tiny", "strategy": "s2", "sample_size": 12}, "data": {"image_size": 12}}
    )
    assert config.model.strategy == "depth" and config.model.dit_kwargs()["hidden_size"] == 32
    assert config.to_dict()["model"] == {"preset": "tiny", "sample_size": 12, "strategy": "depth"}
    with pytest.raises(ValueError, match="model.hidden_size must be of type int"):
        load_config({"model": {"preset": "tiny", "hidden_size": "wide"}})


def test_set_overrides_any_key_and_is_checked_like_the_file(tiny_llama_dir, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir)))
    config = load_config(
        path,
        [
            "model.strategy=s1",
            "train.lr=3e-4",
            "data.counts=[1]",
            "sample.scheduler=FlowMatchHeunDiscreteScheduler",
        ],
    )
    assert (config.model.strategy, config.train.lr, config.data.counts) == ("time", 3e-4, [1])
    assert config.sample.scheduler == "FlowMatchHeunDiscreteScheduler"
    for bad, message in (
        ("train.lr", "takes section.key=value"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("train.nope=1", "unknown config key train.nope"),
        ("model.strategy=random", "unknown fusion strategy"),
        ("train.lr.x=1", "lr is not a section"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config(path, [bad])


def test_metrics_go_to_tensorboard_when_asked(tiny_llama_dir, tmp_path):
    config = load_config(
        tiny_run_config(
            tiny_llama_dir, max_steps=4, log_every=2, checkpoint_every=100, report_to="tensorboard"
        )
    )
    train(config, tmp_path / "run", progress=False)
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 100
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2  # log.jsonl is kept


def test_sample_and_eval_default_to_the_runs_own_sample_settings(trained_run, tmp_path, capsys):
    config, out, result = trained_run
    bench = tmp_path / "bench.json"
    assert main(["eval", "--checkpoint", str(out), "--n", "1", "--out", str(bench), "--device", "cpu"]) == 0
    sampling = json.loads(bench.read_text())["sampling"]
    s = config.sample
    assert (sampling["steps"], sampling["guidance_scale"], sampling["scheduler"]) == (
        s.steps,
        s.guidance_scale,
        s.scheduler,
    )
    other = [
        "eval",
        "--checkpoint",
        str(out),
        "--n",
        "1",
        "--cfg",
        "1.5",
        "--steps",
        "2",
        "--scheduler",
        "FlowMatchHeunDiscreteScheduler",
    ]
    first = bench.read_bytes()
    capsys.readouterr()
    assert main([*other, "--out", str(bench)]) == 2  # results of other settings are never overwritten
    assert "holds results of other settings (sampling differ)" in capsys.readouterr().err
    assert bench.read_bytes() == first
    assert main([*other, "--out", str(tmp_path / "bench2.json")]) == 0
    sampling = json.loads((tmp_path / "bench2.json").read_text())["sampling"]
    assert (sampling["steps"], sampling["guidance_scale"], sampling["scheduler"]) == (
        2,
        1.5,
        "FlowMatchHeunDiscreteScheduler",
    )
    got = SemanticRoutingPipeline.from_checkpoint(result.checkpoint, device="cpu").sampling()
    assert (got.scheduler, got.steps, got.guidance_scale, got.shift) == (
        s.scheduler,
        s.steps,
        s.guidance_scale,
        s.shift,
    )
    capsys.readouterr()
    code = main(
        [
            "sample",
            "--checkpoint",
            str(out),
            "--prompt",
            "one red square",
            "--scheduler",
            "DDIMScheduler",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 2 and "not a diffusers flow-matching scheduler" in capsys.readouterr().err


def test_a_checkpoint_written_before_the_typed_config_still_loads_and_resumes(tiny_llama_dir, tmp_path):
    """Run configs of earlier releases: model as a plain
    mapping, no sample.scheduler, mixed_precision 'no'."""
    raw = tiny_run_config(tiny_llama_dir, max_steps=2, checkpoint_every=100)
    result = train(load_config(raw), tmp_path / "run", progress=False)
    old = {
        **raw,
        "model": {"preset": "tiny", "strategy": "depth", "sample_size": 12},
        "sample": {"steps": 4, "guidance_scale": 2.0, "shift": 1.0, "images_per_prompt": 2},
        "train": {**raw["train"], "mixed_precision": "no"},
    }
    (result.checkpoint / "run_config.yaml").write_text(yaml.safe_dump(old))
    (result.checkpoint / "checkpoint.json").unlink()  # written before checkpoints listed their files
    (tmp_path / "run" / "run_config.yaml").write_text(yaml.safe_dump(old))
    pipe = SemanticRoutingPipeline.from_checkpoint(result.checkpoint, device="cpu")
    assert pipe.sampling().scheduler == "FlowMatchEulerDiscreteScheduler" and pipe.sampling().steps == 4
    assert pipe.generate(["one red square"], seed=0).shape == (1, 3, 12, 12)
    resumed = train(load_config(old), tmp_path / "run", max_steps=3, progress=False)
    assert resumed.steps == 3
