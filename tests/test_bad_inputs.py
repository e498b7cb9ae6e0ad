"""Every user-facing input with bad values: one line naming the problem and the fix, exit 2, no damage.

The cases here are the rows of docs/bad-inputs.md (a test keeps the two in step).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from semroute.cli import main
from semroute.config import load_config

from .conftest import tiny_run_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse usage errors
        code = exit.code
    return code, capsys.readouterr().err


def assert_answered(code: int, err: str, phrase: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and phrase in lines[-1], err
    # The answer is the last line, and the only error line (argparse prints its usage before it).
    assert sum("error:" in line for line in lines) == 1, err


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    """A finished tiny run to point checkpoint flags at."""
    out = tmp_path_factory.mktemp("bad_inputs_run")
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=2)))
    assert main(["train", "--config", str(config), "--out", str(out / "run")]) == 0
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ CLI flags

FLAG_CASES = {
    "train --max-steps 0": (["train", "--config", "{config}", "--max-steps", "0"], "must be >= 1"),
    "sample --compile always": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--compile", "always"],
        "invalid choice: 'always'",
    ),
    "train --max-steps -5": (["train", "--config", "{config}", "--max-steps", "-5"], "must be >= 1"),
    "train --minutes abc": (
        ["train", "--config", "{config}", "--minutes", "abc"],
        "argument --minutes: must be a number, got 'abc'",
    ),
    "train --minutes 0": (["train", "--config", "{config}", "--minutes", "0"], "must be > 0"),
    "train --config missing.yaml": (["train", "--config", "{tmp}/missing.yaml"], "does not exist"),
    "sample --cfg 0.5": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--cfg", "0.5"],
        "argument --cfg: the scale must be >= 1 (1 disables guidance), got 0.5",
    ),
    "sample --steps 0": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--steps", "0"],
        "must be >= 1",
    ),
    "sample --n -1": (["sample", "--checkpoint", "{run}", "--prompt", "x", "--n", "-1"], "must be >= 1"),
    "sample --out x.jpg": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--out", "{tmp}/x.jpg"],
        "--out must be a .png",
    ),
    "sample --checkpoint nowhere": (
        ["sample", "--checkpoint", "{tmp}/nowhere", "--prompt", "x"],
        "does not exist",
    ),
    "eval --out x.txt": (["eval", "--checkpoint", "{run}", "--out", "{tmp}/x.txt"], "--out must be a .json"),
    "ablate --strategies b1,x9": (["ablate", "--out", "{tmp}/abl", "--strategies", "b1,x9"], "x9"),
    "sample-bench --bench other": (
        ["sample-bench", "--checkpoint", "{run}", "--bench", "other", "--prompts", "p", "--out", "o"],
        "invalid choice",
    ),
    "export --out non-empty": (["export", "--checkpoint", "{run}", "--out", "{run}"], "not empty"),
    "precompute without a dataset": (
        ["precompute", "--config", "{config}", "--out", "{tmp}/cache"],
        "needs dataset.manifest",
    ),
    "sample --device tpu": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--device", "tpu"],
        "valid: auto, cpu, cuda, cuda:N or mps",
    ),
    "sample --device cuda without a GPU": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--device", "cuda"],
        "use --device cpu or auto",
    ),
    "train --device cuda:1": (
        ["train", "--config", "{config}", "--device", "cuda:1"],
        "set CUDA_VISIBLE_DEVICES",
    ),
    "eval --precision fp8": (
        ["eval", "--checkpoint", "{run}", "--precision", "fp8"],
        "invalid choice: 'fp8'",
    ),
    "train --set without =": (
        ["train", "--config", "{config}", "--set", "train.lr"],
        "--set takes section.key=value",
    ),
    "train --set unknown key": (
        ["train", "--config", "{config}", "--set", "train.learning_rate=1"],
        "unknown config key train.learning_rate",
    ),
    "sample --scheduler DDIMScheduler": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--scheduler", "DDIMScheduler"],
        "not a diffusers flow-matching scheduler; valid: FlowMatch",
    ),
    "sample --cfg nan": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--cfg", "nan"],
        "must be a finite number, got nan",
    ),
    "train --minutes inf": (
        ["train", "--config", "{config}", "--minutes", "inf"],
        "must be a finite number, got inf",
    ),
    "sample --shift -inf": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--shift=-inf"],
        "must be a finite number",
    ),
    "sample --seed -1": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--seed", "-1"],
        "must be in 0..2147483647",
    ),
    "sample --seed 2**70": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--seed", str(2**70)],
        "must be at most 2,147,483,647",
    ),
    "sample --steps 10**20": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--steps", str(10**20)],
        "must be at most",
    ),
    "train --set train.lr=.nan": (
        ["train", "--config", "{config}", "--set", "train.lr=.nan"],
        "train.lr must be a finite number",
    ),
    "sample --gate-shift on a DiT without time gates": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--gate-shift", "2"],
        "strategy 'depth' has none (use time or joint)",
    ),
    "sample --gate-shift 0": (
        ["sample", "--checkpoint", "{run}", "--prompt", "x", "--gate-shift", "0"],
        "must be > 0",
    ),
    "eval --cfg 3,3": (
        ["eval", "--checkpoint", "{run}", "--cfg", "3,3"],
        "must be distinct scales separated by commas",
    ),
    "ablate s1s without --gate-shift": (
        ["ablate", "--out", "{tmp}/abl", "--strategies", "s1,s1s"],
        "pass --gate-shift",
    ),
    "eval --data not a set": (
        ["eval", "--checkpoint", "{run}", "--data", "{tmp}"],
        "must be a directory written by `semroute data emoji --out DIR`",
    ),
    "eval --limit without --data": (
        ["eval", "--checkpoint", "{run}", "--limit", "5"],
        "--limit applies to --data",
    ),
    "eval --data with several scales": (
        ["eval", "--checkpoint", "{run}", "--data", "{tmp}", "--cfg", "2,3"],
        "give --cfg one value",
    ),
    "autoencoder --downsample 6": (
        ["autoencoder", "--train", "{tmp}/t.jsonl", "--out", "{tmp}/ae", "--downsample", "6"],
        "--downsample must be a power of two",
    ),
    "autoencoder --resolution 60 --downsample 8": (
        [
            "autoencoder",
            "--train",
            "{tmp}/t.jsonl",
            "--out",
            "{tmp}/ae",
            "--resolution",
            "60",
            "--downsample",
            "8",
        ],
        "divisible by --downsample 8",
    ),
    "autoencoder --kl-weight -1": (
        ["autoencoder", "--train", "{tmp}/t.jsonl", "--out", "{tmp}/ae", "--kl-weight=-1"],
        "--kl-weight >= 0",
    ),
    "autoencoder --train missing": (
        ["autoencoder", "--train", "{tmp}/missing.jsonl", "--out", "{tmp}/ae"],
        "missing.jsonl",
    ),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_flags(case, run, tmp_path, capsys):
    argv, phrase = FLAG_CASES[case]
    argv = [a.format(config=run / "config.yaml", run=run / "run", tmp=tmp_path) for a in argv]
    before = snapshot(run)
    assert_answered(*run_cli(capsys, argv), phrase)
    assert snapshot(run) == before


# ------------------------------------------------------------------ config keys

CONFIG_CASES = {
    "unknown top-level key": ({"optimizer": {"lr": 1}}, "unknown config key optimizer; valid:"),
    "unknown nested key": ({"train": {"learning_rate": 1}}, "unknown config key train.learning_rate; valid:"),
    "wrong type": ({"train": {"batch_size": "64"}}, "train.batch_size must be of type int"),
    "bool for an int": ({"train": {"max_steps": True}}, "train.max_steps must be of type int"),
    "zero batch size": ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
    "negative lr": ({"train": {"lr": -1}}, "train.lr must be > 0"),
    "unknown precision": ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision must be one of"),
    "unknown compile mode": ({"train": {"compile": "fast"}}, "train.compile must be one of auto, on, off"),
    "caption dropout 1.5": ({"train": {"caption_dropout": 1.5}}, "train.caption_dropout must be in [0, 1)"),
    "keep no checkpoints": ({"train": {"keep_checkpoints": 0}}, "train.keep_checkpoints must be > 0"),
    "CFG below 1": ({"sample": {"guidance_scale": 0.5}}, "sample.guidance_scale must be >= 1"),
    "zero sampling steps": ({"sample": {"steps": 0}}, "sample.steps must be >= 1"),
    "size not divisible by patch": (
        {"model": {"preset": "tiny", "sample_size": 13}, "data": {"image_size": 13}},
        "not divisible by",
    ),
    "model size differs from data": (
        {"model": {"preset": "tiny", "sample_size": 16}},
        "differs from data.image_size",
    ),
    "unknown strategy": (
        {"model": {"preset": "tiny", "strategy": "random"}},
        "unknown fusion strategy 'random'; valid:",
    ),
    "unknown preset": ({"model": {"preset": "huge"}}, "unknown model.preset 'huge'; valid:"),
    "background not a colour": (
        {"dataset": {"background": "see-through"}},
        "dataset.background must be a colour name or #rrggbb, got 'see-through'",
    ),
    "derived model key": ({"model": {"preset": "tiny", "text_dim": 9}}, "set from the text encoder"),
    "layer out of range": ({"text_encoder": {"layers": [99]}}, "layer 99 is out of range"),
    "template without {prompt}": (
        {"text_encoder": {"template": "an image"}},
        "must be 'chat' or contain '{prompt}'",
    ),
    "template starting with {prompt}": (
        {"text_encoder": {"template": "{prompt} please"}},
        "starts with {prompt}",
    ),
    "two dataset sources": (
        {"dataset": {"manifest": "a.json", "cache": "c"}},
        "set one of manifest, hf_dataset or cache",
    ),
    "missing manifest": (
        {"dataset": {"manifest": "{tmp}/none.jsonl"}, "model": {"preset": "tiny", "sample_size": 256}},
        "does not exist",
    ),
    "cache without cache.json": (
        {"dataset": {"cache": "{tmp}"}, "model": {"preset": "tiny", "sample_size": 256}},
        "not a semroute cache",
    ),
    "zero model width": (
        {"model": {"preset": "tiny", "sample_size": 12, "hidden_size": 0}},
        "model.hidden_size must be a positive integer, got 0",
    ),
    "negative depth": (
        {"model": {"preset": "tiny", "sample_size": 12, "depth": -2}},
        "model.depth must be a positive integer, got -2",
    ),
    "zero patch size": (
        {"model": {"preset": "tiny", "sample_size": 12, "patch_size": 0}},
        "model.patch_size must be a positive integer",
    ),
    "heads that do not divide the width": (
        {"model": {"preset": "tiny", "sample_size": 12, "num_heads": 5}},
        "/ num_heads 5 must give a whole head size divisible by 4",
    ),
    "NaN mlp ratio": (
        {"model": {"preset": "tiny", "sample_size": 12, "mlp_ratio": float("nan")}},
        "model.mlp_ratio must be a finite number",
    ),
    "a model of 10^14 parameters": (
        {"model": {"preset": "tiny", "sample_size": 12, "hidden_size": 1_000_000, "num_heads": 1}},
        "parameters; this is surely a typo",
    ),
    "NaN learning rate": ({"train": {"lr": float("nan")}}, "train.lr must be a finite number, got nan"),
    "infinite guidance": (
        {"sample": {"guidance_scale": float("inf")}},
        "sample.guidance_scale must be a finite number, got inf",
    ),
    "integer overflow": ({"train": {"max_steps": 10**30}}, "train.max_steps is out of range"),
    "seed out of range": ({"train": {"seed": -1}}, "train.seed must be in 0..2147483647"),
    "template with an unknown field": (
        {"text_encoder": {"template": "An image of {prompt} by {artist}"}},
        "template has fields 'artist': only {prompt} is filled in",
    ),
    "template with an unbalanced brace": (
        {"text_encoder": {"template": "An image of {prompt"}},
        "is not a valid format",
    ),
    "template with a bad format spec": (
        {"text_encoder": {"template": "An image of {prompt:zz}"}},
        "cannot be filled in",
    ),
    "zero max length": ({"text_encoder": {"max_length": 0}}, "text_encoder.max_length must be in 1..32768"),
    "max length past the LLM's positions": (
        {"text_encoder": {"max_length": 1000}},
        "is beyond the 128 positions this LLM was trained on",
    ),
    "no colours": ({"data": {"colours": []}}, "data.colours must list some of"),
    "tiny shapes canvas": ({"data": {"image_size": 2}}, "data.image_size must be in 8..1024"),
    "estimated gates without time gates": (
        {"model": {"preset": "tiny", "sample_size": 12, "gate_signal": "estimated"}},
        "use strategy time or joint (s1, s3), or gate_signal nominal",
    ),
    "unknown gate signal": (
        {"model": {"preset": "tiny", "sample_size": 12, "gate_signal": "guess"}},
        "unknown model.gate_signal 'guess'; valid: nominal, estimated",
    ),
    "deep fusion with a head layout the LLM cannot fill": (
        {"model": {"preset": "tiny", "sample_size": 12, "strategy": "fusedit"}},
        "the LLM's attention has 2 key/value heads of size 8, this DiT has 2 heads of size 16; set "
        "model.num_heads",
    ),
    "deep fusion with one layer too many": (
        {
            "model": {"preset": "tiny", "sample_size": 12, "strategy": "deep", "num_heads": 4},
            "text_encoder": {"layers": [1, 2, 3]},
        },
        "pairs each of the 2 DiT blocks with one LLM layer, but text_encoder.layers names 3",
    ),
    "text features that do not fit the strategy": (
        {
            "model": {"preset": "tiny", "sample_size": 12, "strategy": "depth"},
            "text_encoder": {"features": "keys_values"},
        },
        "text_encoder.features 'keys_values' does not fit model.strategy 'depth', which reads hidden_states",
    ),
    "unknown text features": (
        {"text_encoder": {"features": "attention"}},
        "text_encoder.features must be one of hidden_states, keys_values or null",
    ),
}


def _merge(base: dict, change: dict, tmp: Path) -> dict:
    for key, value in change.items():
        if isinstance(value, dict) and key != "model":
            base[key] = {
                **base.get(key, {}),
                **{k: v.replace("{tmp}", str(tmp)) if isinstance(v, str) else v for k, v in value.items()},
            }
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_keys(case, tiny_llama_dir, tmp_path, capsys):
    change, phrase = CONFIG_CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_merge(tiny_run_config(tiny_llama_dir), change, tmp_path)))
    assert_answered(
        *run_cli(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "out")]), phrase
    )
    assert not (tmp_path / "out" / "checkpoints").exists()


FILE_CASES = {
    "config not UTF-8": (b"train: {lr: \xff}\n", "not valid UTF-8 YAML"),
    "config YAML syntax error": (b"train: [unclosed\n", "not valid UTF-8 YAML"),
    "config is a list": (b"- 1\n- 2\n", "must be a mapping"),
    "YAML alias bomb": (
        (
            "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
            + "".join(
                f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
            )
        ).encode(),
        "expands to more than 100,000 YAML nodes",
    ),
    "YAML alias to itself": (b"train: &t {lr: *t}\n", "refers to itself through an alias"),
    "YAML nested 100,000 deep": (b"train: " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_config_files(case, tmp_path, capsys):
    content, phrase = FILE_CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert_answered(
        *run_cli(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "out")]), phrase
    )


# ------------------------------------------------------------------ checkpoints, prompt files, output
# directories


def test_truncated_weights(run, tmp_path, capsys):
    copy = tmp_path / "ckpt"
    shutil.copytree(run / "run" / "checkpoints" / "step_000002", copy)
    weights = copy / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    code, err = run_cli(
        capsys, ["sample", "--checkpoint", str(copy), "--prompt", "x", "--out", str(tmp_path / "s.png")]
    )
    assert_answered(code, err, "diffusion_pytorch_model.safetensors is truncated or damaged")


def test_foreign_safetensors(run, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    copy = tmp_path / "ckpt"
    shutil.copytree(run / "run" / "checkpoints" / "step_000002", copy)
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4)}, copy / "diffusion_pytorch_model.safetensors")
    code, err = run_cli(capsys, ["routing", "--checkpoint", str(copy), "--out", str(tmp_path / "r.png")])
    # Checkpoint.json's sizes
    assert_answered(code, err, "diffusion_pytorch_model.safetensors is truncated or damaged")
    (
        copy / "checkpoint.json"
    ).unlink()  # as written before checkpoint.json: the weights themselves are checked
    code, err = run_cli(capsys, ["routing", "--checkpoint", str(copy), "--out", str(tmp_path / "r.png")])
    assert_answered(code, err, "holds weights of another model")


def test_checkpoint_of_another_strategy_on_resume(run, tiny_llama_dir, tmp_path, capsys):
    shutil.copytree(run / "run", tmp_path / "run")
    raw = tiny_run_config(tiny_llama_dir, strategy="single", max_steps=4)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    before = snapshot(tmp_path / "run")
    code, err = run_cli(
        capsys, ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]
    )
    assert_answered(code, err, "model.strategy: checkpoint 'depth', now 'single'")
    assert snapshot(tmp_path / "run") == before


def test_out_is_a_file(run, tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    code, err = run_cli(
        capsys, ["train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "file")]
    )
    assert code == 2 and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "keep me"


def test_prompt_files(run, tmp_path, capsys):
    cases = {
        "non-UTF-8": (b"\xff\xfe\x00\x01", "geneval", "not UTF-8"),
        "CSV without Prompt": (b"text,Category\na,b\n", "drawbench", "header holding 'Prompt'"),
        "GeneVal line not JSON": (b'{"prompt": "a"}\nnope\n', "geneval", "line 2 is not JSON"),
        "empty": (b"", "geneval", "holds no prompts"),
    }
    for content, bench, phrase in cases.values():
        path = tmp_path / "prompts"
        path.write_bytes(content)
        argv = [
            "sample-bench",
            "--checkpoint",
            str(run / "run"),
            "--bench",
            bench,
            "--prompts",
            str(path),
            "--out",
            str(tmp_path / "o"),
        ]
        assert_answered(*run_cli(capsys, argv), phrase)


def test_huge_prompt_is_truncated_not_fatal(run, tmp_path, capsys, caplog):
    prompt = "red " * 50_000
    code, err = run_cli(
        capsys,
        [
            "sample",
            "--checkpoint",
            str(run / "run"),
            "--prompt",
            prompt,
            "--n",
            "1",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "s.png"),
        ],
    )
    assert code == 0 and (tmp_path / "s.png").is_file()
    assert "truncated to text_encoder.max_length=16" in caplog.text


def test_every_case_is_in_the_docs_table():
    text = DOC.read_text()
    for case in [*FLAG_CASES, *CONFIG_CASES, *FILE_CASES]:
        assert f"| {case} |" in text, f"docs/bad-inputs.md lacks a row for {case!r}"


# ------------------------------------------------------------------ fuzzing

VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
SECTIONS = {
    "model": ["preset", "strategy", "sample_size", "depth", "hidden_size"],
    "train": ["batch_size", "lr", "max_steps", "minutes", "betas", "mixed_precision", "caption_dropout"],
    "sample": ["steps", "guidance_scale", "shift"],
    "data": ["image_size", "counts", "colours"],
    "text_encoder": ["layers", "template", "max_length"],
    "dataset": ["manifest", "resolution", "strict"],
}
CONFIGS = st.dictionaries(
    st.sampled_from([*SECTIONS, "bogus"]),
    st.dictionaries(
        st.sampled_from(sorted({k for keys in SECTIONS.values() for k in keys}) + ["preset"]),
        VALUES,
        max_size=3,
    )
    | VALUES,
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS)
@example({"model": {"preset": []}})  # found by this test: an unhashable preset used to raise TypeError
def test_fuzzed_configs_load_or_raise_a_value_error(data):
    try:
        load_config(data)
    except ValueError as err:
        assert str(err) and "\n" not in str(err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=200), min_size=1, max_size=3))
def test_fuzzed_prompts_encode_to_finite_features(tiny_encoder, prompts):
    import torch

    hidden, mask = tiny_encoder(prompts)
    assert hidden.shape[1] == len(prompts) and torch.isfinite(hidden).all()
    assert mask.any(dim=1).all()  # the template's own tokens are always there
