"""sample-bench layouts on the real GenEval / GenAI-Bench prompt files, resume, and the export command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from semroute.bench.public import image_path, read_prompts, sample_bench
from semroute.cli import main

from .conftest import tiny_run_config

EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
GENEVAL = EVAL / "geneval" / "evaluation_metadata.jsonl"
GENAIBENCH = EVAL / "genaibench" / "genai_image_527.json"
needs_shared = pytest.mark.skipif(not GENEVAL.is_file(), reason="../shared/eval is not beside this checkout")


class CountingPipeline:
    """Returns a distinct flat image per (prompt, seed) and counts calls."""

    def sampling(self, steps=None, guidance_scale=None, shift=None):
        from semroute.flow import SampleConfig

        return SampleConfig()

    def __init__(self):
        self.images = 0

    def generate(self, prompts, steps, guidance_scale, shift, seed, on_step=None):
        self.images += len(prompts)
        return torch.stack([torch.full((3, 8, 8), (s % 251) / 251) for s in seed])


@needs_shared
def test_real_prompt_files_are_read_whole():
    geneval = read_prompts("geneval", GENEVAL)
    assert (
        len(geneval) == 553
        and geneval[0].metadata["tag"]
        and geneval[0].prompt == geneval[0].metadata["prompt"]
    )
    genai = read_prompts("genaibench", GENAIBENCH)
    assert len(genai) == 527 and genai[0].key == "00001" and genai[0].prompt


@needs_shared
def test_geneval_layout_and_resume(tmp_path):
    prompts = read_prompts("geneval", GENEVAL)[:3]
    pipe = CountingPipeline()
    report = sample_bench(pipe, "geneval", prompts, tmp_path, n=2, batch_size=4, progress=False)
    assert report["written"] == 6 and pipe.images == 6
    for p in prompts:
        folder = tmp_path / f"{p.index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == p.metadata
        assert sorted(x.name for x in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    # Image 1 of prompt 2 came from seed 2001.
    pixel = Image.open(tmp_path / "00002" / "samples" / "0001.png").getpixel((0, 0))[0]
    assert abs(pixel - round(2001 % 251 / 251 * 255)) <= 1
    (tmp_path / "00001" / "samples" / "0000.png").unlink()
    kept = (tmp_path / "00001" / "samples" / "0001.png").stat().st_mtime_ns
    again = sample_bench(pipe, "geneval", prompts, tmp_path, n=2, batch_size=4, progress=False)
    # Only the batch holding the missing image is sampled again (batches are fixed, so its images are the
    # same); only the missing image is written.
    assert again == {**again, "written": 1, "already_there": 5} and pipe.images == 6 + 4
    assert (tmp_path / "00001" / "samples" / "0001.png").stat().st_mtime_ns == kept
    assert not list(tmp_path.rglob(".*.tmp"))


@needs_shared
def test_genaibench_and_drawbench_layouts(tmp_path):
    genai = read_prompts("genaibench", GENAIBENCH)[:2]
    sample_bench(CountingPipeline(), "genaibench", genai, tmp_path / "genai", n=2, progress=False)
    assert sorted(
        p.relative_to(tmp_path / "genai").as_posix() for p in (tmp_path / "genai").rglob("*.jpeg")
    ) == ["sample_0/00001.jpeg", "sample_0/00002.jpeg", "sample_1/00001.jpeg", "sample_1/00002.jpeg"]
    drawbench = tmp_path / "drawbench.csv"
    drawbench.write_text(
        'Prompt,Category\nA red colored car.,Colors\n"A tower, tall",Positional\n', encoding="utf-8"
    )
    prompts = read_prompts("drawbench", drawbench)
    sample_bench(CountingPipeline(), "drawbench", prompts, tmp_path / "draw", n=1, progress=False)
    rows = list(csv.DictReader((tmp_path / "draw" / "metadata.csv").open()))
    assert rows == [
        {"file": "images/000_0.png", "Prompt": "A red colored car.", "Category": "Colors"},
        {"file": "images/001_0.png", "Prompt": "A tower, tall", "Category": "Positional"},
    ]
    assert image_path("drawbench", tmp_path / "draw", prompts[1], 0).is_file()


def test_bad_prompt_files_name_the_problem(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("text,Category\nx,y\n")
    with pytest.raises(ValueError, match="header holding 'Prompt'"):
        read_prompts("drawbench", bad)
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts("geneval", bad)
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_prompts("geneval", bad)
    bad.write_text('["a", "b"]')
    with pytest.raises(ValueError, match="keyed by prompt id"):
        read_prompts("genaibench", bad)


@pytest.mark.parametrize("key", ["../../evil", "/tmp/evil", ".hidden", "a/b", "x" * 200, ""])
def test_genaibench_ids_never_become_paths_outside_out(tmp_path, key):
    bad = tmp_path / "genai.json"
    bad.write_text(json.dumps({"00001": {"prompt": "a cat"}, key: {"prompt": "a dog"}}))
    with pytest.raises(ValueError, match="ids become file names"):
        read_prompts("genaibench", bad)


def test_an_output_of_other_settings_is_refused_never_mixed(tmp_path):
    drawbench = tmp_path / "drawbench.csv"
    drawbench.write_text("Prompt,Category\nA red colored car.,Colors\nA blue cat.,Colors\n", encoding="utf-8")
    prompts = read_prompts("drawbench", drawbench)
    out = tmp_path / "draw"
    sample_bench(CountingPipeline(), "drawbench", prompts, out, n=2, progress=False)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changes = {"n": {"n": 1}, "seed": {"seed": 7}, "prompts": {"prompts": prompts[:1]}}
    for change in changes.values():
        kwargs = {"prompts": prompts, "n": 2, **change}
        with pytest.raises(ValueError, match="was sampled with other settings .*; sample into another --out"):
            sample_bench(
                CountingPipeline(), "drawbench", kwargs.pop("prompts"), out, progress=False, **kwargs
            )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    (out / ".semroute-sampling.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged: choose another --out"):
        sample_bench(CountingPipeline(), "drawbench", prompts, out, n=2, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no .semroute-sampling.json"):
        sample_bench(CountingPipeline(), "drawbench", prompts, foreign, n=1, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@needs_shared
def test_cli_sample_bench_and_export_from_a_trained_run(tmp_path, tiny_llama_dir, capsys):
    from semroute.pipeline import SemanticRoutingPipeline

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama_dir, max_steps=2)))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    args = [
        "sample-bench",
        "--checkpoint",
        str(tmp_path / "run"),
        "--bench",
        "geneval",
        "--prompts",
        str(GENEVAL),
        "--out",
        str(tmp_path / "geneval"),
        "--limit",
        "2",
        "--n",
        "1",
        "--steps",
        "2",
    ]
    assert main(args) == 0
    assert len(list((tmp_path / "geneval").rglob("*.png"))) == 2
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")]) == 0
    pipe = SemanticRoutingPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe("one red square", num_inference_steps=2).images[0].size == (12, 12)
    # `sample` takes the exported directory as well as the run, and draws the same images from it.
    for source, name in ((tmp_path / "pipe", "from_pipe.png"), (tmp_path / "run", "from_run.png")):
        assert (
            main(
                [
                    "sample",
                    "--checkpoint",
                    str(source),
                    "--prompt",
                    "one red square",
                    "--n",
                    "10",
                    "--steps",
                    "2",
                    "--precision",
                    "fp32",
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    from semroute.bench.sampling import sample_all
    from semroute.pipeline import load_pipeline

    drawn = [
        sample_all(
            load_pipeline(source, device="cpu", precision="fp32"),
            ["one red square"],
            3,
            steps=2,
            seed=5,
            batch_size=2,
        )
        for source in (tmp_path / "pipe", tmp_path / "run")
    ]
    torch.testing.assert_close(drawn[0], drawn[1], rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")]) == 2
    assert "not empty" in capsys.readouterr().err
